import pytest

from l2a.data.tasks import TaskSample, score_prediction, score_samples

CASES = [
    ("The numbers are 123 and 456.", ["123", "456"], "all", 1.0),
    ("only 123", ["123", "456"], "all", 0.5),
    ("nothing", ["123", "456"], "all", 0.0),
    ("only 456", ["123", "456"], "part", 1.0),
    ("nothing", ["123", "456"], "part", 0.0),
    ("BRISK-Lantern", ["brisk-lantern"], "all", 1.0),  # case-insensitive
    ("", ["a"], "all", 0.0),
]


@pytest.mark.parametrize(("prediction", "answers", "metric", "expected"), CASES)
def test_score_prediction(prediction, answers, metric, expected):
    assert score_prediction(prediction, answers, metric) == expected


def sample(answers, metric="all"):
    return TaskSample("t", [1, 2], answers, [3], metric, None, [], 4)


def test_score_samples_percent_and_argument_order():
    samples = [sample(["a", "b"]), sample(["c"]), sample(["x", "y"], "part")]
    predictions = ["a b", "z", "y"]
    assert score_samples(predictions, samples) == pytest.approx(100 * (1 + 0 + 1) / 3)
    assert score_samples(samples, predictions) == score_samples(predictions, samples)


def test_score_errors():
    with pytest.raises(ValueError, match="metric"):
        score_prediction("a", ["a"], "any")
    with pytest.raises(ValueError, match="predictions"):
        score_samples(["a"], [])
    with pytest.raises(ValueError, match="empty"):
        score_prediction("a", [], "all")
