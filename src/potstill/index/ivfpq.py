"""A differentiable IVF-PQ quantiser in torch that mirrors FAISS's `IndexIVFPQ` (by_residual=True).

Notation: x ∈ R^d a vector, o_1..o_L the L = nlist coarse centroids, C^1..C^M the M PQ codebooks of
ksub = 2^nbits codewords of dsub = d/M dimensions each, x^m the m-th sub-vector (dimensions
m·dsub .. (m+1)·dsub − 1).

- Coarse assignment: c(x) = argmax_i ⟨x, o_i⟩ for metric "ip", argmin_i ‖x − o_i‖² for "l2" (FAISS's
  quantizer is an IndexFlatIP / IndexFlatL2 over the centroids).
- Residual: u = x − o_c(x). PQ code of sub-vector m: k_m = argmin_j ‖u^m − C^m_j‖² (always L2, as FAISS).
- Reconstruction: x̂ = o_c(x) + û, û = [C^1_{k_1}, ..., C^M_{k_M}].
- Search (nprobe lists): the nprobe centroids nearest to the query by the metric are probed, and every vector
  in them is scored ⟨q, x̂⟩ ("ip", higher is better) or ‖q − x̂‖² ("l2", lower is better).

Differentiable forward (Distill-VQ, Xiao et al. 2022, "Distill-VQ: Learning Retrieval Oriented Vector
Quantization By Distilling Knowledge from Dense Embeddings"; official code staoxiao/LibVQ,
LibVQ/models/pq_quantizer.py): the soft assignment a^m = softmax_j(−‖u^m − C^m_j‖² / τ_a) is replaced by the
straight-through one-hot h^m + a^m − sg(a^m), so the forward value is exactly the hard reconstruction while
the gradient of the loss reaches the codewords (through the chosen one and through a^m), the centroids
(through o_c(x) and through u) and the input vectors (through u). The coarse assignment c(x) carries no
gradient; Distill-VQ keeps it fixed during training.

Initialisation: `train_faiss_ivfpq` runs FAISS's own k-means training (`faiss.IndexIVFPQ.train`: spherical
k-means for "ip", plain k-means for "l2", then PQ k-means on the residuals) and `IVFPQ.from_faiss` reads the
trained centroids and codebooks, so a learned quantiser starts exactly where FAISS ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from potstill.errors import UserError

METRICS = ("ip", "l2")


def import_faiss() -> Any:
    """The faiss module, or a UserError naming the pip command when it is missing."""
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - faiss-cpu is a dependency
        raise UserError("potstill.index needs FAISS; install it with `pip install faiss-cpu`") from err
    return faiss


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f'metric must be one of {METRICS} ("ip" = inner product, "l2" = squared L2), got {metric!r}')
    return metric


def faiss_metric(metric: str) -> int:
    faiss = import_faiss()
    return faiss.METRIC_INNER_PRODUCT if check_metric(metric) == "ip" else faiss.METRIC_L2


def as_float32_matrix(x: Any, name: str, d: int | None = None) -> np.ndarray:
    """`x` (array-like or tensor) as a C-contiguous float32 `(n, d)` numpy array, with a clear error otherwise."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    arr = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (n, d) matrix, got shape {arr.shape}")
    if d is not None and arr.shape[1] != d:
        raise ValueError(f"{name} must have {d} columns (the quantiser's dimension), got {arr.shape[1]}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return arr


@dataclass
class Quantized:
    """The output of `IVFPQ.forward` for n vectors.

    `coarse` = o_c(x) `(n, d)`; `quantized` = o_c(x) + û `(n, d)`, its value the exact hard reconstruction;
    `list_ids` `(n,)` the coarse assignment; `codes` `(n, M)` the PQ codes (int64).
    """

    coarse: Tensor
    quantized: Tensor
    list_ids: Tensor
    codes: Tensor


class IVFPQ(nn.Module):
    """Learnable IVF-PQ over residuals, with FAISS's IndexIVFPQ semantics (see the module docstring).

    Parameters: `centroids` `(nlist, d)`, `codebooks` `(M, ksub, dsub)` with ksub = 2^nbits and d = M·dsub;
    `metric` "ip" (default) or "l2"; `soft_temperature` τ_a of the soft assignment used by the
    straight-through gradient (default 1.0, as LibVQ's softmax(−‖u − c‖²)).
    """

    def __init__(
        self,
        centroids: Tensor | np.ndarray,
        codebooks: Tensor | np.ndarray,
        *,
        metric: str = "ip",
        soft_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        centroids = torch.as_tensor(np.asarray(centroids) if not isinstance(centroids, Tensor) else centroids)
        codebooks = torch.as_tensor(np.asarray(codebooks) if not isinstance(codebooks, Tensor) else codebooks)
        if centroids.dim() != 2 or centroids.shape[0] < 1:
            raise ValueError(f"centroids must be (nlist, d), got shape {tuple(centroids.shape)}")
        if codebooks.dim() != 3:
            raise ValueError(f"codebooks must be (M, ksub, dsub), got shape {tuple(codebooks.shape)}")
        m, ksub, dsub = codebooks.shape
        if m * dsub != centroids.shape[1]:
            raise ValueError(
                f"codebooks (M={m}, dsub={dsub}) cover {m * dsub} dimensions but the centroids have "
                f"{centroids.shape[1]}"
            )
        nbits = int(round(math.log2(ksub))) if ksub > 0 else 0
        if ksub < 2 or 2**nbits != ksub or nbits > 16:
            raise ValueError(f"ksub must be a power of two 2^nbits with 1 <= nbits <= 16, got {ksub}")
        if not soft_temperature > 0:
            raise ValueError(f"soft_temperature must be > 0, got {soft_temperature!r}")
        self.metric = check_metric(metric)
        self.soft_temperature = float(soft_temperature)
        self.centroids = nn.Parameter(centroids.detach().to(torch.float32).clone())
        self.codebooks = nn.Parameter(codebooks.detach().to(torch.float32).clone())

    # ----------------------------------------------------------------- shapes
    @property
    def d(self) -> int:
        return self.centroids.shape[1]

    @property
    def nlist(self) -> int:
        return self.centroids.shape[0]

    @property
    def m(self) -> int:
        return self.codebooks.shape[0]

    @property
    def ksub(self) -> int:
        return self.codebooks.shape[1]

    @property
    def dsub(self) -> int:
        return self.codebooks.shape[2]

    @property
    def nbits(self) -> int:
        return int(round(math.log2(self.ksub)))

    @property
    def code_size(self) -> int:
        """Bytes of one PQ code, ⌈M·nbits / 8⌉ (FAISS's `code_size`); an IVF list also stores an 8-byte id."""
        return (self.m * self.nbits + 7) // 8

    def extra_repr(self) -> str:
        return f"d={self.d}, nlist={self.nlist}, m={self.m}, nbits={self.nbits}, metric={self.metric!r}"

    # ------------------------------------------------------------ conversion
    @classmethod
    def from_faiss(cls, index: Any, *, soft_temperature: float = 1.0) -> IVFPQ:
        """The quantiser of a trained `faiss.IndexIVFPQ` (by_residual=True): its centroids and PQ codebooks."""
        faiss = import_faiss()
        original = index  # keep the caller's object (the owner of the C++ index) alive while reading it
        index = faiss.downcast_index(original)
        if not isinstance(index, faiss.IndexIVFPQ):
            raise ValueError(f"expected a faiss.IndexIVFPQ, got {type(original).__name__}")
        if not index.is_trained:
            raise ValueError("the faiss.IndexIVFPQ is not trained; call index.train(x) first")
        if not index.by_residual:
            raise ValueError("only by_residual=True IndexIVFPQ (FAISS's default) can be read")
        if index.metric_type not in (faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2):
            raise ValueError(f"unsupported faiss metric {index.metric_type}; use inner product or L2")
        metric = "ip" if index.metric_type == faiss.METRIC_INNER_PRODUCT else "l2"
        centroids = index.quantizer.reconstruct_n(0, index.nlist)
        pq = index.pq
        codebooks = faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)
        del original
        return cls(centroids, codebooks, metric=metric, soft_temperature=soft_temperature)

    # -------------------------------------------------------------- quantise
    def _check_input(self, x: Tensor, name: str = "x") -> Tensor:
        if not isinstance(x, Tensor):
            x = torch.as_tensor(np.asarray(x, dtype=np.float32))
        if x.dim() != 2 or x.shape[1] != self.d:
            raise ValueError(f"{name} must be (n, {self.d}), got shape {tuple(x.shape)}")
        return x.to(device=self.centroids.device, dtype=torch.float32)

    def centroid_scores(self, x: Tensor) -> Tensor:
        """`(n, nlist)` similarity of each vector to each centroid (higher = nearer): ⟨x, o⟩ or −‖x − o‖²."""
        x = self._check_input(x)
        return self._similarity(x, self.centroids)

    def _similarity(self, q: Tensor, v: Tensor) -> Tensor:
        ip = q @ v.T
        if self.metric == "ip":
            return ip
        return 2 * ip - (q * q).sum(-1, keepdim=True) - (v * v).sum(-1)

    @torch.no_grad()
    def assign(self, x: Tensor) -> Tensor:
        """The coarse list of each vector `(n,)`, int64: its nearest centroid by the metric."""
        return self.centroid_scores(x).argmax(-1)

    def _sub_distances(self, u: Tensor) -> Tensor:
        """‖u^m − C^m_j‖² for every sub-vector and codeword: `(n, M, ksub)`."""
        u3 = u.reshape(u.shape[0], self.m, self.dsub)
        cb = self.codebooks
        cross = torch.einsum("nmd,mkd->nmk", u3, cb)
        return (u3 * u3).sum(-1, keepdim=True) - 2 * cross + (cb * cb).sum(-1).unsqueeze(0)

    def _list_ids(self, x: Tensor, list_ids: Tensor | None) -> Tensor:
        if list_ids is None:
            return self.assign(x)
        list_ids = torch.as_tensor(list_ids, device=x.device).long()
        if list_ids.shape != (x.shape[0],):
            raise ValueError(f"list_ids must have shape ({x.shape[0]},), got {tuple(list_ids.shape)}")
        if list_ids.numel() and (int(list_ids.min()) < 0 or int(list_ids.max()) >= self.nlist):
            raise ValueError(f"list_ids must lie in [0, {self.nlist}), got values out of range")
        return list_ids

    def forward(self, x: Tensor, list_ids: Tensor | None = None) -> Quantized:
        """Quantise `x` `(n, d)`: hard values, straight-through gradients (see the module docstring).

        `list_ids` fixes the coarse assignment (Distill-VQ keeps the one of its initial index); by default each
        vector goes to its nearest centroid.
        """
        x = self._check_input(x)
        list_ids = self._list_ids(x, list_ids)
        coarse = self.centroids[list_ids]
        u = x - coarse
        dist = self._sub_distances(u)
        codes = dist.detach().argmin(-1)
        soft = F.softmax(-dist / self.soft_temperature, dim=-1)
        hard = F.one_hot(codes, self.ksub).to(soft.dtype)
        # Value: exactly `hard` (soft − sg(soft) is 0.0); gradient: that of `soft`.
        assignment = hard + (soft - soft.detach())
        residual = torch.einsum("nmk,mkd->nmd", assignment, self.codebooks).reshape(x.shape[0], self.d)
        return Quantized(coarse=coarse, quantized=coarse + residual, list_ids=list_ids, codes=codes)

    @torch.no_grad()
    def encode(self, x: Tensor, list_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(list_ids `(n,)`, codes `(n, M)`) of `x`, int64, as FAISS's `add` computes them."""
        x = self._check_input(x)
        list_ids = self._list_ids(x, list_ids)
        codes = self._sub_distances(x - self.centroids[list_ids]).argmin(-1)
        return list_ids, codes

    def decode(self, list_ids: Tensor, codes: Tensor) -> Tensor:
        """Reconstructions o_c + û `(n, d)` from list ids `(n,)` and PQ codes `(n, M)`."""
        list_ids = torch.as_tensor(list_ids, device=self.centroids.device).long()
        codes = torch.as_tensor(codes, device=self.centroids.device).long()
        if codes.dim() != 2 or codes.shape[1] != self.m or list_ids.shape != codes.shape[:1]:
            raise ValueError(
                f"codes must be (n, {self.m}) and list_ids (n,), got {tuple(codes.shape)} and {tuple(list_ids.shape)}"
            )
        sub = self.codebooks[torch.arange(self.m, device=codes.device), codes]  # (n, M, dsub)
        return self.centroids[list_ids] + sub.reshape(codes.shape[0], self.d)

    def similarity(self, queries: Tensor, vectors: Tensor) -> Tensor:
        """`(nq, n)` query–vector similarity by the metric: ⟨q, v⟩ ("ip") or −‖q − v‖² ("l2")."""
        return self._similarity(self._check_input(queries, "queries"), self._check_input(vectors, "vectors"))

    # ----------------------------------------------------------------- search
    @torch.no_grad()
    def search(
        self,
        queries: Tensor,
        list_ids: Tensor,
        codes: Tensor,
        k: int,
        *,
        nprobe: int = 1,
        chunk_size: int = 1024,
    ) -> tuple[Tensor, Tensor]:
        """Search encoded vectors the way `faiss.IndexIVFPQ.search` does; returns (distances, labels) `(nq, k)`.

        The `nprobe` lists nearest each query are probed; every vector in them is scored on its reconstruction.
        Distances follow FAISS: inner products, descending, for "ip"; squared L2 distances, ascending, for "l2".
        Missing results (fewer than k vectors in the probed lists) have label -1 and distance −inf ("ip") or
        +inf ("l2"), where FAISS reports -3.4e38 / 3.4e38. Labels are row indices into `codes`.
        """
        queries = self._check_input(queries, "queries")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        nprobe = max(1, min(int(nprobe), self.nlist))
        recon = self.decode(list_ids, codes)
        list_ids = torch.as_tensor(list_ids, device=recon.device).long()
        n = recon.shape[0]
        kk = min(k, n)
        out_d, out_i = [], []
        for start in range(0, queries.shape[0], chunk_size):
            q = queries[start : start + chunk_size]
            probe = self._similarity(q, self.centroids).topk(nprobe, dim=-1).indices
            probed = torch.zeros(q.shape[0], self.nlist, dtype=torch.bool, device=q.device)
            probed.scatter_(1, probe, True)
            sim = self._similarity(q, recon).masked_fill(~probed[:, list_ids], float("-inf"))
            top = sim.topk(kk, dim=-1)
            labels = top.indices.masked_fill(torch.isinf(top.values), -1)
            values = top.values
            if kk < k:
                pad = k - kk
                values = torch.cat([values, values.new_full((q.shape[0], pad), float("-inf"))], 1)
                labels = torch.cat([labels, labels.new_full((q.shape[0], pad), -1)], 1)
            out_d.append(values if self.metric == "ip" else -values)
            out_i.append(labels)
        return torch.cat(out_d), torch.cat(out_i)


def train_faiss_ivfpq(
    x: Any,
    *,
    nlist: int,
    m: int,
    nbits: int = 8,
    metric: str = "ip",
    seed: int = 1234,
) -> Any:
    """A `faiss.IndexIVFPQ` trained by FAISS's own k-means on `x` `(n, d)` (empty: nothing added).

    FAISS's defaults are kept (coarse k-means 10 iterations, spherical for "ip"; PQ k-means 25 iterations on the
    residuals; at most 256 training points per centroid), with `seed` for both clusterings (FAISS's default
    1234). Only the "too few training points" warning is silenced (min_points_per_centroid = 1, which changes
    nothing else in the clustering).
    """
    faiss = import_faiss()
    x = as_float32_matrix(x, "training vectors")
    d = x.shape[1]
    _check_shape(d, nlist=nlist, m=m, nbits=nbits, n=x.shape[0])
    quantizer = faiss.IndexFlatIP(d) if check_metric(metric) == "ip" else faiss.IndexFlatL2(d)
    index = _owning_ivfpq(faiss, quantizer, d, nlist, m, nbits, faiss_metric(metric))
    for cp in (index.cp, index.pq.cp):
        cp.seed = int(seed)
        cp.min_points_per_centroid = 1
    index.train(x)
    return index


def _owning_ivfpq(faiss: Any, quantizer: Any, *args: int) -> Any:
    """An IndexIVFPQ that owns (and frees) its coarse quantizer, so no Python reference must keep it alive."""
    index = faiss.IndexIVFPQ(quantizer, *args)
    index.own_fields = True
    quantizer.this.disown()
    return index


def _check_shape(d: int, *, nlist: int, m: int, nbits: int, n: int | None = None) -> None:
    if nlist < 1:
        raise ValueError(f"nlist must be >= 1, got {nlist}")
    if m < 1 or d % m:
        raise ValueError(f"m (number of PQ sub-quantisers) must divide the dimension {d}, got {m}")
    if not 1 <= nbits <= 16:
        raise ValueError(f"nbits must be in [1, 16], got {nbits}")
    if n is not None and n < max(nlist, 2**nbits):
        raise ValueError(
            f"need at least max(nlist, 2^nbits) = {max(nlist, 2**nbits)} training vectors for k-means, got {n}"
        )


def export_faiss(
    quantiser: IVFPQ,
    vectors: Any,
    *,
    nprobe: int = 1,
    list_ids: Tensor | np.ndarray | None = None,
) -> Any:
    """A real `faiss.IndexIVFPQ` holding the quantiser's centroids and codebooks, with `vectors` added.

    The index is built from scratch: an IndexFlatIP / IndexFlatL2 coarse quantizer over the centroids, the PQ
    codebooks copied into `index.pq.centroids` (`faiss.copy_array_to_vector`), the residual tables recomputed
    (`precompute_table`), then the vectors added (ids 0..n−1). By default FAISS assigns each vector to its
    nearest centroid, as `IVFPQ.encode` does; `list_ids` `(n,)` instead puts vector i into list `list_ids[i]`
    (FAISS's `add_core` with precomputed assignments), e.g. the fixed assignment Distill-VQ trained with. The
    PQ codes are always FAISS's own encoding of the residuals. The result needs only faiss: it searches,
    `faiss.write_index` / `faiss.read_index` round-trip it, and `index.nprobe` is set to `nprobe`.
    """
    faiss = import_faiss()
    if not isinstance(quantiser, IVFPQ):
        raise TypeError(f"quantiser must be a potstill IVFPQ, got {type(quantiser).__name__}")
    x = as_float32_matrix(vectors, "vectors", quantiser.d)
    d, nlist = quantiser.d, quantiser.nlist
    centroids = np.ascontiguousarray(quantiser.centroids.detach().cpu().numpy(), dtype=np.float32)
    codebooks = np.ascontiguousarray(quantiser.codebooks.detach().cpu().numpy(), dtype=np.float32)
    coarse = faiss.IndexFlatIP(d) if quantiser.metric == "ip" else faiss.IndexFlatL2(d)
    coarse.add(centroids)
    index = _owning_ivfpq(faiss, coarse, d, nlist, quantiser.m, quantiser.nbits, faiss_metric(quantiser.metric))
    faiss.copy_array_to_vector(codebooks.ravel(), index.pq.centroids)
    index.is_trained = True
    index.precompute_table()
    if list_ids is None:
        index.add(x)
    else:
        assign = np.ascontiguousarray(
            list_ids.detach().cpu().numpy() if isinstance(list_ids, Tensor) else np.asarray(list_ids), dtype=np.int64
        )
        if assign.shape != (x.shape[0],):
            raise ValueError(f"list_ids must have shape ({x.shape[0]},), got {assign.shape}")
        if assign.size and (assign.min() < 0 or assign.max() >= nlist):
            raise ValueError(f"list_ids must lie in [0, {nlist})")
        index.add_core(x.shape[0], faiss.swig_ptr(x), None, faiss.swig_ptr(assign))
    index.nprobe = max(1, min(int(nprobe), nlist))
    return index
