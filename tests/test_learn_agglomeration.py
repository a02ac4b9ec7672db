"""Learned agglomeration: the classifier file, the teacher, and segment(score="learned")."""

import json

import dask
import dask.array as da
import numpy as np
import pytest
from test_segment import _check_invariance, assert_same_partition

from emdask import evaluate, open_volume
from emdask.agglomerate import _WEIGHTS, FEATURES, _run, agglomerate
from emdask.learn_agglomeration import (
    EdgeClassifier,
    load_classifier,
    merge_examples,
    train_agglomeration,
)
from emdask.region_graph import RegionGraph
from emdask.segmentation import segment


@pytest.fixture(scope="module")
def medulla_crops():
    """The shipped fibsem net's affinities (uint8, as the pipeline stores them) of a medulla
    crop, in two halves: a classifier learns from the first."""
    from conftest import FILES

    from emdask.models import pretrained
    from emdask.predict import predict_affinities

    if not FILES["medulla"].exists():
        pytest.skip("real data not available (../shared/data is absent)")
    raw = open_volume(str(FILES["medulla"]), "raw")[100:180, :128, :128]
    gt = open_volume(str(FILES["medulla"]), "labels/neuron_ids")[100:180, :128, :128].values
    affs = predict_affinities(raw, pretrained("fibsem"), dtype="uint8")[:3].values
    raw = raw.values
    return (affs[:, :40], gt[:40], raw[:40]), (affs[:, 40:], gt[40:], raw[40:])


@pytest.fixture(scope="module")
def classifier(medulla_crops):
    return train_agglomeration([medulla_crops[0]], rounds=2, n_estimators=40)  # with raw


def test_classifier_predicts_as_sklearn_and_survives_a_file(tmp_path):
    from sklearn.ensemble import HistGradientBoostingClassifier

    rng = np.random.default_rng(0)
    x = rng.random((400, len(FEATURES)))
    y = x[:, 0] + 0.3 * x[:, 8] + rng.normal(0, 0.1, 400) > 0.7
    model = HistGradientBoostingClassifier(max_iter=15, random_state=0).fit(x, y)
    clf = EdgeClassifier.from_sklearn(model, card={"note": "test"})
    np.testing.assert_allclose(clf.predict(x), model.predict_proba(x)[:, 1], atol=1e-12)
    clf.save(tmp_path / "c.json")
    back = load_classifier(tmp_path / "c.json")
    np.testing.assert_array_equal(back.predict(x), clf.predict(x))
    assert back.card == {"note": "test"} and back.bins == clf.bins


def test_classifier_files_are_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such.json: no such classifier"):
        load_classifier(tmp_path / "no-such.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="bad.json: cannot read an edge classifier"):
        load_classifier(bad)
    bad.write_text(json.dumps({"format": "emdask-edge-classifier/1", "features": ["mean"]}))
    with pytest.raises(ValueError, match="trained on features"):
        load_classifier(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not an emdask edge classifier"):
        load_classifier(bad)
    doc = json.loads((_WEIGHTS / "fibsem_agglomeration.json").read_text())  # the shipped one
    for key, value, message in (("feature", 99, "feature index"), ("left", 0, "children")):
        broken = json.loads(json.dumps(doc))
        broken["trees"][key][0][0] = value
        bad.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=message):
            load_classifier(bad)


def test_teacher_merges_only_within_true_neurons():
    # a chain of 6 regions, true neurons {0, 1, 2} and {3, 4, 5}; region 5 unlabelled
    n = 6
    u, v = np.arange(5), np.arange(1, 6)
    count = np.full(5, 10)
    g = RegionGraph(u, v, count, count * 60000, np.full(5, 65535),
                    np.tile([0] * 15 + [10], (5, 1)))
    truth = np.array([1, 1, 1, 2, 2, 0])
    reps, x, right, _ = _run(g, n, [1.0], "mean", np.full(n, 100), None, truth)
    assert len(set(reps[0][:3])) == 1 and reps[0][3] == reps[0][4]
    assert reps[0][0] != reps[0][3] and reps[0][5] == 5
    # the decisions: two merges inside neuron 1, one inside 2, one refused between them;
    # the edge to the unlabelled region gives no example
    assert sorted(right.tolist()) == [False, True, True, True]
    assert x.shape == (4, len(FEATURES)) and np.isfinite(x).all()
    # region 5 a membrane (2-D labels' boundary, -1): its merge is a wrong example
    reps, x, right, _ = _run(g, n, [1.0], "mean", np.full(n, 100), None, np.r_[truth[:5], -1])
    assert sorted(right.tolist()) == [False, False, True, True, True] and reps[0][5] == 5


def test_an_edge_that_became_cheap_merges_before_the_threshold():
    """Lazy rescoring: a region's growth lowers the cost of its other edge below the
    threshold; it must merge although an unrelated costlier edge stops the queue first."""
    # one tree: mean > 0.9 -> log-odds +5; mean <= 0.7 -> +2 if the larger region has more
    # than 150 voxels (cost 0.12) else -2 (cost 0.88); otherwise -0.405 (cost 0.6)
    big = np.log(150)
    clf = EdgeClassifier(np.array([[0, 0, 0, 9, 0, 0, 0]]),
                         np.array([[0.9, 0.7, 0, big, 0, 0, 0]]),
                         np.array([[1, 3, -1, 5, -1, -1, -1]]),
                         np.array([[2, 4, -1, 6, -1, -1, -1]]),
                         np.array([[0, 0, 5.0, 0, -0.405, -2.0, 2.0]]), 0.0, bins=4)
    u, v, mean = np.array([0, 1, 3]), np.array([1, 2, 4]), np.array([0.95, 0.5, 0.8])
    q = (mean * 65535).astype(np.int64)
    hist = np.zeros((3, 4), np.int64)
    hist[np.arange(3), np.minimum((mean * 4).astype(int), 3)] = 10
    g = RegionGraph(u, v, np.full(3, 10), q * 10, q, hist)
    reps = agglomerate(g, 5, [0.5], "learned", sizes=np.array([100, 100, 10, 100, 100]),
                       classifier=clf)[0]
    assert reps.tolist() == [1, 1, 1, 3, 4]  # 2 joined {0, 1} (cost 0.12); 3-4 (0.6) not
    # the same, whatever other thresholds are computed with it
    sweep = agglomerate(g, 5, [0.005, 0.5], "learned", classifier=clf,
                        sizes=np.array([100, 100, 10, 100, 100]))
    assert sweep[1].tolist() == reps.tolist()


def test_merge_examples_checks_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        merge_examples(np.zeros((3, 4, 4, 4), np.float32), np.zeros((4, 4, 5), np.int64))
    with pytest.raises(ValueError, match="background must be"):
        merge_examples(np.zeros((3, 4, 4, 4), np.float32), np.zeros((4, 4, 4), np.int64),
                       background="membrane")


def test_learned_needs_a_classifier_and_its_bins(classifier):
    affs = np.random.default_rng(0).random((3, 8, 8, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="needs a classifier"):
        segment(affs, [0.5], score="learned")
    with pytest.raises(ValueError, match="needs bins = 16"):
        segment(affs, [0.5], score="learned", classifier=classifier, bins=32,
                raw=np.zeros(affs.shape[1:], np.uint8))
    with pytest.raises(ValueError, match="sizes"):
        agglomerate(RegionGraph.empty(16, raw=True), 2, [0.5], "learned",
                    classifier=classifier, raw=np.zeros(2, np.int64))


def test_learned_segmentation_does_not_depend_on_the_chunking(medulla_crops, classifier):
    affs, _, raw = medulla_crops[1]
    box = np.s_[:30, :60, :60]
    assert classifier.raw
    _check_invariance(affs[(slice(None), *box)], [(13, 31, 27), (30, 17, 60)],
                      score="learned", classifier=classifier, raw=raw[box])


def test_learned_segmentation_is_the_in_memory_agglomeration(medulla_crops, classifier):
    """Blockwise: every statistic (raw on boundaries across block faces included) is
    the one of the whole volume's region graph."""
    from emdask.region_graph import region_graph

    affs, _, raw = medulla_crops[1]
    [fragments, labels] = dask.compute(*segment(
        da.from_array(affs, chunks=(3, 16, 50, 70)), [0.5], return_fragments=True,
        score="learned", classifier=classifier, raw=da.from_array(raw, chunks=(16, 50, 70))))
    n = int(fragments.max())
    graph = region_graph(fragments, affs, classifier.bins, raw).shifted(-1, -1)
    sizes = np.bincount(fragments.ravel(), minlength=n + 1)[1:]
    inside = np.bincount(fragments.ravel(), raw.ravel().astype(float), n + 1)[1:]
    # ties in cost go as segment() breaks them: by the fragments' highest voxel index
    flat = fragments.ravel().astype(np.int64)
    rank = np.full(n + 1, -1, np.int64)
    np.maximum.at(rank, flat, np.arange(flat.size))
    [reps] = agglomerate(graph, n, [0.5], "learned", sizes=sizes, classifier=classifier,
                         raw=inside.astype(np.int64), rank=rank[1:])
    assert_same_partition(labels, np.r_[0, reps + 1][fragments])


def test_raw_features_need_raw(medulla_crops, classifier):
    affs = medulla_crops[1][0]
    with pytest.raises(ValueError, match="uses raw EM features: pass raw="):
        segment(affs, [0.5], score="learned", classifier=classifier)
    with pytest.raises(ValueError, match="raw must be uint8"):
        segment(affs, [0.5], score="learned", classifier=classifier,
                raw=np.zeros(affs.shape[1:], np.float32))
    with pytest.raises(ValueError, match=r"raw \(2, 2, 2\) and affinities"):
        segment(affs, [0.5], score="learned", classifier=classifier,
                raw=np.zeros((2, 2, 2), np.uint8))


def test_learned_beats_mean_on_a_region_it_never_saw(medulla_crops, classifier):
    affs, gt, raw = medulla_crops[1]
    ths = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]

    def best(**kw):
        return min(evaluate(s, gt)["voi"] for s in dask.compute(*segment(affs, ths, **kw)))

    mean, learned = best(), best(score="learned", classifier=classifier, raw=raw)
    assert learned < mean, (learned, mean)
