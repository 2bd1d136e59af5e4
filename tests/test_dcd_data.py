"""DCD's data: teacher-mined hard negatives (potstill.data.hard_negatives), digit style captions
(potstill.data.digit_styles) and the dual-encoder scorer student (potstill.students.image_text_scorer)."""

import pytest
import torch

from potstill.data.digit_styles import (
    STYLE_TEMPLATES,
    StyleBins,
    ink_mass,
    slant,
    style_captions,
    style_class_words,
    style_classes,
    style_relevance,
)
from potstill.data.hard_negatives import candidate_lists, mine_hard_negatives, random_negatives, sample_positives
from potstill.eval.zero_shot import retrieval_recall
from potstill.students.image_text_scorer import image_text_scorer

# 2 images × 6 texts; image 0 matches text 0, image 1 matches texts 4 and 5
RELEVANT = torch.tensor([[True, False, False, False, False, False],
                         [False, False, False, False, True, True]])
TEACHER = torch.tensor([[9.0, 1.0, 5.0, 3.0, 4.0, 2.0],
                        [0.0, 7.0, 1.0, 6.0, 9.0, 8.0]])


def test_mining_every_candidate_keeps_the_teachers_best_non_relevant_texts():
    mined = mine_hard_negatives(TEACHER, RELEVANT, candidates=4, keep=2, generator=torch.Generator().manual_seed(0))
    # image 1 has exactly 4 non-relevant texts, so all are drawn: the best two are texts 1 (7.0) and 3 (6.0)
    assert mined[1].tolist() == [1, 3]
    # image 0 draws 4 of its 5 non-relevant texts; whatever it drew, the kept two are its best, best first
    assert not bool(RELEVANT[0, mined[0]].any())
    scores = TEACHER[0, mined[0]]
    assert scores[0] > scores[1] and float(scores[1]) >= 3.0


def test_mined_negatives_outscore_random_ones_and_repeat_with_the_seed():
    torch.manual_seed(0)
    teacher = torch.randn(50, 40)
    relevant = torch.zeros(50, 40, dtype=torch.bool)
    relevant[torch.arange(50), torch.arange(50) % 40] = True
    mined = mine_hard_negatives(teacher, relevant, candidates=15, keep=7, generator=torch.Generator().manual_seed(1))
    again = mine_hard_negatives(teacher, relevant, candidates=15, keep=7, generator=torch.Generator().manual_seed(1))
    rand = random_negatives(relevant, keep=7, generator=torch.Generator().manual_seed(1))
    assert torch.equal(mined, again)
    assert not bool(relevant.gather(1, mined).any()) and not bool(relevant.gather(1, rand).any())
    assert all(len(set(row)) == 7 for row in mined.tolist())
    assert float(teacher.gather(1, mined).mean()) > float(teacher.gather(1, rand).mean()) + 0.5


def test_positives_and_candidate_lists():
    positives = sample_positives(RELEVANT, generator=torch.Generator().manual_seed(0))
    assert positives[0] == 0 and int(positives[1]) in (4, 5)
    lists = candidate_lists(positives, torch.tensor([[1, 2], [0, 3]]))
    assert lists[:, 1:].tolist() == [[1, 2], [0, 3]] and torch.equal(lists[:, 0], positives)


def test_mining_refuses_impossible_counts():
    with pytest.raises(ValueError, match="non-relevant"):
        mine_hard_negatives(TEACHER, RELEVANT, candidates=5, keep=2)
    with pytest.raises(ValueError, match="keep"):
        mine_hard_negatives(TEACHER, RELEVANT, candidates=3, keep=4)


def test_style_measures_on_drawn_strokes():
    right = torch.zeros(1, 28, 28)
    left = torch.zeros(1, 28, 28)
    for y in range(4, 24):  # a stroke whose top sits right of its bottom leans right
        right[0, y, 24 - y // 2] = 1.0
        left[0, y, 4 + y // 2] = 1.0
    assert float(slant(right)) < 0 < float(slant(left))
    assert float(ink_mass(right)) == pytest.approx(20.0)
    assert float(ink_mass((right + right.roll(1, dims=2)).clamp(max=1))) == pytest.approx(40.0)


def test_style_classes_and_captions():
    bins = StyleBins(weight=torch.tensor([[10.0, 30.0]] * 10), slant=torch.tensor([[-0.1, 0.1]] * 10))
    image = torch.zeros(1, 28, 28)
    for y in range(4, 24):
        image[0, y, 24 - y // 2] = 1.0  # ink 20 → medium; leaning right
    assert style_classes(image, torch.tensor([7]), bins).tolist() == [7 * 9 + 1 * 3 + 2]
    assert style_class_words(7 * 9 + 5) == ("seven", "medium", "leaning right")
    captions, classes = style_captions()
    assert len(captions) == 90 * len(STYLE_TEMPLATES) and classes[3].item() == 1
    assert captions[0] == "a handwritten thin zero leaning left."
    assert captions[5] == "an image of a thin zero upright, drawn by hand."
    relevant = style_relevance(torch.tensor([1]), classes)
    assert relevant.sum().item() == len(STYLE_TEMPLATES) and relevant[0, 3:6].all()


def test_scorer_scores_candidates_like_the_full_matrix():
    model = image_text_scorer(embed_dim=8, text_dim=8, width=2, hidden=4, scale=10.0, seed=0)
    assert torch.equal(model.text_map.weight, torch.eye(8))
    pixels, texts = torch.rand(3, 1, 28, 28), torch.randn(5, 8)
    candidates = torch.tensor([[0, 1], [4, 2], [3, 3]])
    full = model.score_all(pixels, texts)
    assert torch.allclose(model.score(pixels, texts, candidates), full.gather(1, candidates), atol=1e-5)
    assert float(full.detach().abs().max()) <= 10.0 + 1e-4
    # ranking by the retrieval metric's cosine equals ranking by the scores
    relevant = full == full.max(dim=1, keepdim=True).values
    recall = retrieval_recall(model.encode_images(pixels), model.encode_texts(texts), relevant, ks=(1,))
    assert recall["i2t_r@1"] == 1.0
    again = image_text_scorer(embed_dim=8, text_dim=8, width=2, hidden=4, scale=10.0, seed=0)
    assert torch.equal(again.score_all(pixels, texts), full)


def test_style_tower_appends_pooled_conv_maps_to_the_cnn_features():
    pytest.importorskip("ccexam", reason="the MNIST CNN's weights come with ccexam (assets extra)")
    from potstill.teachers.lit import mnist_cnn_features
    from potstill.teachers.style_tower import mnist_cnn_style_features

    tower = mnist_cnn_style_features(pool=2)
    pixels = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        features = tower(pixels)
        assert features.shape == (2, tower.feature_dim) == (2, 128 + 64 * 4)
        assert torch.allclose(features[:, :128], mnist_cnn_features()(pixels), atol=1e-5)
