"""Tests for potstill.teachers.cache: the on-disk top-k teacher store."""

from __future__ import annotations

import json
import math
import pickle
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from potstill.errors import UserError
from potstill.losses.divergences import forward_kl
from potstill.losses.sparse import TopKTeacher, sparse_forward_kl, sparse_version
from potstill.teachers.cache import TopKCache
from potstill.teachers.cache_format import FORMAT_VERSION, bytes_per_token_for, decode_ids, encode_ids, id_high_bits
from potstill.teachers.cache_writer import TopKCacheWriter

META = {"teacher": "tiny-gpt", "teacher_hash": "abc123", "tokenizer_hash": "tok9", "data_fingerprint": "data42"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _records(n_records=9, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [int(x) for x in torch.randint(0, 8, (n_records,), generator=g)]
    lengths[0] = 7
    return {r * 3 + 1: torch.randn(n, vocab, generator=g) * 3 for r, n in enumerate(lengths)}


def _write(path, records, *, k=8, temperature=1.0, vocab=50, shard_tokens=10, order_seed=1, **kw):
    order = list(records)
    random.Random(order_seed).shuffle(order)
    with TopKCacheWriter(path, k=k, temperature=temperature, vocab_size=vocab, meta=META,
                         shard_tokens=shard_tokens, **kw) as w:
        for r in order:
            w.add(r, records[r])
    return path


@pytest.fixture()
def cache_dir(tmp_path):
    return _write(tmp_path / "cache", _records())


# --- round trip -------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_round_trip_by_record_index(tmp_path, temperature):
    records = _records()
    path = _write(tmp_path / "c", records, temperature=temperature)
    cache = TopKCache(path, expect={"k": 8, "temperature": temperature, **META})
    assert cache.num_records == len(records)
    assert cache.num_tokens == sum(len(x) for x in records.values())
    assert len(cache.manifest["shards"]) > 1
    assert cache.records == sorted(records)
    wanted = sorted(records, reverse=True)
    teacher, mask = cache.get(wanted, return_mask=True)
    longest = max(len(records[r]) for r in wanted)
    assert teacher.shape == (len(wanted), longest) and teacher.k == 8
    assert teacher.ids.dtype == torch.int64 and teacher.logprobs.dtype == torch.float32
    for b, r in enumerate(wanted):
        n = len(records[r])
        assert mask[b].tolist() == [True] * n + [False] * (longest - n)
        logp = F.log_softmax(records[r] / temperature, -1)
        lp, ids = logp.topk(8, -1)
        assert torch.equal(teacher.ids[b, :n], ids)
        torch.testing.assert_close(teacher.logprobs[b, :n], lp, rtol=1e-3, atol=2e-3)
        exact_tail = logp.scatter(-1, ids, -math.inf).logsumexp(-1)
        torch.testing.assert_close(teacher.tail_logprob[b, :n], exact_tail)
        assert bool((teacher.logprobs[b, :n].diff(dim=-1) <= 0).all())


def test_padding_rows_are_a_uniform_valid_distribution(cache_dir):
    cache = TopKCache(cache_dir)
    short = min(cache.records, key=lambda r: cache.lengths([r])[0])
    teacher = cache.get([short], length=9)
    n = cache.lengths([short])[0]
    pad = -math.log(9)
    assert torch.equal(teacher.ids[0, n:], torch.arange(8).expand(9 - n, 8))
    assert torch.allclose(teacher.logprobs[0, n:], torch.full((9 - n, 8), pad))
    assert torch.allclose(teacher.tail_logprob[0, n:], torch.full((9 - n,), pad))
    # The k + 1 buckets of a padding row sum to 1, and every sparse loss stays finite on it unmasked.
    assert torch.allclose(torch.cat([teacher.logprobs[0, n:], teacher.tail_logprob[0, n:, None]], -1).exp().sum(-1),
                          torch.ones(9 - n))
    s = torch.randn(1, 9, 50, requires_grad=True)
    for name in ("forward_kl", "reverse_kl", "generalized_jsd", "skew_reverse_kl", "tvd"):
        out = sparse_version(name)(s, teacher)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(s.grad).all()


def test_length_truncation_left_padding_and_expect_lengths(cache_dir):
    cache = TopKCache(cache_dir)
    full = cache.get([1])
    assert full.shape == (1, 7)
    cut = cache.get([1], length=4)
    assert torch.equal(cut.ids, full.ids[:, :4])
    left, mask = cache.get([1, 4], length=9, padding_side="left", return_mask=True)
    n4 = cache.lengths([4])[0]
    assert torch.equal(left.ids[0, 2:], full.ids[0])
    assert mask[0].tolist() == [False, False] + [True] * 7
    assert mask[1].sum().item() == n4 and bool(mask[1, 9 - n4:].all())
    assert cache.get([1], expect_lengths=[7]).shape == (1, 7)
    with pytest.raises(UserError, match=r"record 1: cached 7, batch 6"):
        cache.get([1], expect_lengths=torch.tensor([6]))
    assert cache.get([], length=3).shape == (0, 3)
    with pytest.raises(ValueError, match="padding_side"):
        cache.get([1], padding_side="middle")


def test_missing_record_is_refused(cache_dir):
    cache = TopKCache(cache_dir)
    assert 1 in cache and 2 not in cache
    with pytest.raises(UserError, match=r"record\(s\) \[2\] are not in the cache"):
        cache.get([1, 2])


def test_cache_to_sparse_loss_matches_in_memory_top_k(tmp_path):
    torch.manual_seed(3)
    vocab = 40
    logits = {r: torch.randn(6, vocab) * 2 for r in range(4)}
    for k in (5, vocab):
        cache = TopKCache(_write(tmp_path / f"k{k}", logits, k=k, vocab=vocab, temperature=2.0))
        teacher, mask = cache.get([3, 0, 2], return_mask=True)
        s = torch.randn(3, 6, vocab)
        t = torch.stack([logits[r] for r in (3, 0, 2)])
        lp, ids = F.log_softmax(t / 2.0, -1).topk(k, -1)
        tail = F.log_softmax(t / 2.0, -1).scatter(-1, ids, -math.inf).logsumexp(-1) if k < vocab else None
        want = sparse_forward_kl(s, TopKTeacher(ids, lp, tail), temperature=2.0, mask=mask)
        got = sparse_forward_kl(s, teacher, temperature=2.0, mask=mask)
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
        if k == vocab:
            torch.testing.assert_close(got, forward_kl(s, t, temperature=2.0), rtol=2e-3, atol=2e-3)


def test_top_k_tuple_input_and_large_vocab_ids(tmp_path):
    vocab, k = 128_000, 6
    g = torch.Generator().manual_seed(4)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(5)])
    ids[0, :2] = torch.tensor([vocab - 1, 65_536])
    lp = F.log_softmax(torch.randn(5, k, generator=g), -1) - 1.0  # mass e^-1 inside, tail 1 - e^-1
    with TopKCacheWriter(tmp_path / "c", k=k, temperature=1.0, vocab_size=vocab, meta={}) as w:
        w.add(0, (ids, lp))
        w.add(1, (ids[:2], lp[:2], torch.full((2,), -0.5)))
    cache = TopKCache(tmp_path / "c")
    assert cache.manifest["id_encoding"]["high_bits"] == 1
    teacher = cache.get([0, 1])
    order = lp.argsort(-1, descending=True)
    assert torch.equal(teacher.ids[0], ids.gather(-1, order))
    torch.testing.assert_close(teacher.logprobs[0], lp.gather(-1, order), rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(teacher.tail_logprob[0], torch.full((5,), math.log1p(-math.exp(-1.0))))
    assert torch.allclose(teacher.tail_logprob[1, :2], torch.tensor(-0.5))


@pytest.mark.parametrize("vocab", [50, 65_536, 65_537, 128_000, 151_936, 2**20, 2**31])
def test_id_encoding_round_trip(vocab):
    rng = np.random.default_rng(5)
    ids = rng.integers(0, vocab, size=(7, 13), dtype=np.int64)
    ids[0, 0], ids[0, 1] = vocab - 1, 0
    h = id_high_bits(vocab)
    low, high = encode_ids(ids, h)
    assert low.dtype == np.uint16 and (high is None) == (h == 0)
    if high is not None:
        assert high.shape == (7, math.ceil(13 * h / 8))
    assert np.array_equal(decode_ids(low, high, h), ids)


# --- storage budget -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("vocab", "expected"), [(49_152, 260), (128_000, 268), (151_936, 276), (32_000, 260)])
def test_bytes_per_token_at_k64(tmp_path, vocab, expected):
    assert bytes_per_token_for(64, vocab) == expected
    n = 2000
    g = torch.Generator().manual_seed(6)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:64] for _ in range(4)]).repeat(n // 4, 1)
    lp = torch.linspace(-0.5, -30, 64).expand(n, 64)
    with TopKCacheWriter(tmp_path / "c", k=64, temperature=1.0, vocab_size=vocab, meta=META) as w:
        w.add(0, (ids, lp, torch.full((n,), -3.0)))
    cache = TopKCache(tmp_path / "c")
    assert cache.bytes_per_token == expected
    measured = sum(s["bytes"] for s in cache.manifest["shards"]) / cache.num_tokens
    assert cache.manifest["file_bytes_per_token"] == pytest.approx(measured)
    assert expected <= measured < expected + 1
    if vocab <= 131_072:
        assert measured <= 300


def test_float16_beats_bfloat16_for_log_probs():
    x = torch.linspace(-30.0, 0.0, 100_001, dtype=torch.float64)
    err16 = (x.half().double() - x).abs().max().item()
    errbf = (x.bfloat16().double() - x).abs().max().item()
    assert err16 <= 2**-7 and errbf >= 4 * err16  # 0.0078 vs 0.0625 at |x| in [16, 32)
    assert torch.isfinite(torch.tensor(-60_000.0).half())  # far-tail log-probs still fit float16's range


# --- refusals -----------------------------------------------------------------------------------------


def test_changed_expected_fields_are_listed(cache_dir):
    with pytest.raises(UserError) as info:
        TopKCache(cache_dir, expect={"tokenizer_hash": "tok10", "k": 64, "temperature": 1.0, "teacher": "tiny-gpt",
                                     "max_length": 512})
    msg = str(info.value)
    assert "tokenizer_hash: cached 'tok9', expected 'tok10'" in msg
    assert "k: cached 8, expected 64" in msg
    assert "max_length: cached <not recorded>, expected 512" in msg
    assert "temperature" not in msg and "teacher:" not in msg
    assert str(cache_dir) in msg


def _shard(cache_dir, i=0):
    return cache_dir / json.loads((cache_dir / "manifest.json").read_text())["shards"][i]["file"]


def test_truncated_shard_is_refused(cache_dir):
    shard = _shard(cache_dir, 1)
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    for verify in (True, False):
        with pytest.raises(UserError, match=rf"shard {shard.name} is {len(data) - 10} bytes .* \(truncated\)"):
            TopKCache(cache_dir, verify=verify)


def test_flipped_byte_is_refused(cache_dir):
    shard = _shard(cache_dir, 0)
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=rf"shard {shard.name} fails its sha256 checksum"):
        TopKCache(cache_dir)
    cache = TopKCache(cache_dir, verify=False)  # sizes still agree: only hashing finds it
    with pytest.raises(UserError, match="sha256"):
        cache.verify()


def test_missing_shard_is_refused(cache_dir):
    shard = _shard(cache_dir, 0)
    shard.unlink()
    with pytest.raises(UserError, match=rf"shard {shard.name} is missing"):
        TopKCache(cache_dir, verify=False)


def test_corrupted_index_is_refused(cache_dir):
    index = cache_dir / "index.safetensors"
    data = bytearray(index.read_bytes())
    data[-1] ^= 0x01
    index.write_bytes(bytes(data))
    with pytest.raises(UserError, match="index index.safetensors fails its sha256"):
        TopKCache(cache_dir, verify=False)


def test_wrong_format_version_is_refused(cache_dir):
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=rf"format version {FORMAT_VERSION + 1}, but this potstill reads version "):
        TopKCache(cache_dir)


def test_not_a_cache_is_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        TopKCache(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError, match="no manifest.json"):
        TopKCache(tmp_path / "half")
    (tmp_path / "half" / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot be read as JSON"):
        TopKCache(tmp_path / "half")


# --- writer behaviour ---------------------------------------------------------------------------------


def test_failed_write_leaves_existing_cache_untouched(cache_dir):
    before = {p.name: p.read_bytes() for p in cache_dir.iterdir()}
    with pytest.raises(RuntimeError, match="teacher crashed"):
        with TopKCacheWriter(cache_dir, k=8, temperature=1.0, vocab_size=50, meta=META, overwrite=True) as w:
            w.add(0, torch.randn(3, 50))
            raise RuntimeError("teacher crashed")
    assert {p.name: p.read_bytes() for p in cache_dir.iterdir()} == before
    assert [p.name for p in cache_dir.parent.iterdir()] == [cache_dir.name]  # no temp folder left


def test_overwrite_rules(tmp_path, cache_dir):
    with pytest.raises(UserError, match="already exists"):
        TopKCacheWriter(cache_dir, k=8, temperature=1.0, vocab_size=50, meta=META)
    other = tmp_path / "my_data"
    other.mkdir()
    (other / "train.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="is not a potstill top-k cache; refusing"):
        TopKCacheWriter(other, k=8, temperature=1.0, vocab_size=50, meta=META, overwrite=True)
    _write(cache_dir, {5: torch.randn(2, 50)}, overwrite=True)
    assert TopKCache(cache_dir).records == [5]


def test_writer_errors(tmp_path):
    w = TopKCacheWriter(tmp_path / "c", k=4, temperature=1.0, vocab_size=10, meta={})
    w.add(3, torch.randn(2, 10))
    with pytest.raises(ValueError, match="already added"):
        w.add(3, torch.randn(2, 10))
    with pytest.raises(ValueError, match="vocab_size=10"):
        w.add(4, torch.randn(2, 11))
    with pytest.raises(ValueError, match="distinct"):
        w.add(4, (torch.tensor([[1, 1, 2, 3]]), torch.full((1, 4), -2.0)))
    with pytest.raises(ValueError, match="NaN"):
        w.add(4, torch.full((1, 10), math.nan))
    w.abort()
    assert not (tmp_path / "c").exists() and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="k must be"):
        TopKCacheWriter(tmp_path / "d", k=11, temperature=1.0, vocab_size=10, meta={})
    with pytest.raises(ValueError, match="manifest's own fields"):
        TopKCacheWriter(tmp_path / "d", k=2, temperature=1.0, vocab_size=10, meta={"k": 2})
    with pytest.raises(ValueError, match="JSON"):
        TopKCacheWriter(tmp_path / "d", k=2, temperature=1.0, vocab_size=10, meta={"x": object()})


def test_manifest_contents_and_pickling(cache_dir):
    cache = TopKCache(cache_dir)
    m = cache.manifest
    assert m["format_version"] == FORMAT_VERSION and m["meta"] == META
    assert m["k"] == 8 and m["temperature"] == 1.0 and m["vocab_size"] == 50
    assert m["logprob_dtype"] == "float16" and m["bytes_per_token"] == bytes_per_token_for(8, 50) == 36
    assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in m["shards"])
    first = cache.get([1, 7])
    clone = pickle.loads(pickle.dumps(cache))  # DataLoader workers get a copy without open handles
    assert torch.equal(clone.get([1, 7]).ids, first.ids)


@pytest.mark.parametrize("chunk_bytes", [4 * 11, 4 * 11 * 3, 1 << 28])  # one row, 3 rows (uneven), all at once
def test_batched_top_k_equals_row_by_row(chunk_bytes):
    from potstill.teachers.cache_format import top_k_of_dense, top_k_of_dense_rows

    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    ids, logprobs, tail = top_k_of_dense_rows(logits, 4, 2.0, chunk_bytes=chunk_bytes)
    assert ids.shape == logprobs.shape == (2, 5, 4) and tail.shape == (2, 5)
    for b in range(2):
        want = top_k_of_dense(logits[b], 4, 2.0)
        for got, expected in zip((ids[b], logprobs[b], tail[b]), want, strict=True):
            assert torch.equal(got, expected)
    all_ids, _, all_tail = top_k_of_dense_rows(logits, 11, 1.0, chunk_bytes=chunk_bytes)  # k = V: no tail
    assert torch.equal(all_ids.sort(-1).values, torch.arange(11).expand(2, 5, 11)) and torch.isinf(all_tail).all()
