import pytest

from vlmkit.eval.metrics import (
    grounding_metrics,
    markdown_table,
    normalize_answer,
    parse_yes_no,
    pope_metrics,
    score,
)

# --------------------------------------------------------------------------------------------------
# normalize_answer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Red.", "red"),
        ("Three", "3"),
        ("a red star", "red star"),
        ("An oval", "oval"),
        ("  TEN  ", "10"),
        ("zero", "0"),
        ("eleven", "eleven"),  # only zero..ten are mapped
        ("two red circles", "2 red circles"),
        ("The  big   red star!?", "big red star"),
        ('"Left."', "left"),
        ("red .", "red"),
        ("a", "a"),  # an article alone is the whole answer, not dropped
        ("the a", "a"),  # only one leading article is dropped
        ("", ""),
        (None, ""),
        ("<box>1,2,3,4</box>", "<box>1,2,3,4</box>"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


# --------------------------------------------------------------------------------------------------
# parse_yes_no


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes, there is", "yes"),
        ("no.", "no"),
        ("YES!", "yes"),
        ("I think yes", "yes"),
        ("Yes there is", "yes"),
        ("The answer is no.", "no"),
        ("No, yes would be wrong", "no"),  # a punctuated leading word decides
        ("maybe", None),
        ("yes and no", None),
        ("nope", None),  # whole words only
        ("none", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


# --------------------------------------------------------------------------------------------------
# pope_metrics


def _pope(accuracy, precision, recall, f1, yes_ratio, n, unparseable):
    return dict(
        accuracy=accuracy, precision=precision, recall=recall, f1=f1, yes_ratio=yes_ratio, n=n, unparseable=unparseable
    )


def test_pope_metrics_hand_worked():
    preds = ["yes", "Yes, there is.", "no", "No.", "yes", "maybe", "no"]
    truths = ["yes", "yes", "yes", "no", "no", "yes", "no"]
    # tp=2 (0, 1), fn=2 (2, and unparseable 5), tn=2 (3, 6), fp=1 (4)
    m = pope_metrics(preds, truths)
    assert m["n"] == 7
    assert m["unparseable"] == 1
    assert m["accuracy"] == pytest.approx(4 / 7)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))
    assert m["f1"] == pytest.approx(4 / 7)
    assert m["yes_ratio"] == pytest.approx(3 / 7)
    assert set(m) == {"accuracy", "precision", "recall", "f1", "yes_ratio", "n", "unparseable"}


def test_pope_metrics_perfect():
    m = pope_metrics(["yes", "no", "yes", "no"], ["yes", "no", "yes", "no"])
    assert m == _pope(1.0, 1.0, 1.0, 1.0, 0.5, 4, 0)


def test_pope_metrics_zero_division():
    empty = pope_metrics([], [])
    assert empty == _pope(0.0, 0.0, 0.0, 0.0, 0.0, 0, 0)
    # No "yes" predictions: precision has no denominator; no "yes" truths: recall has none.
    m = pope_metrics(["no", "no"], ["no", "no"])
    assert m["accuracy"] == 1.0
    assert m["precision"] == m["recall"] == m["f1"] == m["yes_ratio"] == 0.0


def test_pope_metrics_unparseable_is_wrong_non_yes():
    # Unparseable on a "no" truth is still wrong (not a true negative) and not a positive prediction.
    m = pope_metrics(["maybe", None, "yes"], ["no", "yes", "yes"])
    assert m["unparseable"] == 2
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["precision"] == 1.0  # the only positive prediction is right
    assert m["recall"] == pytest.approx(1 / 2)  # the unparseable "yes" truth is a false negative
    assert m["yes_ratio"] == pytest.approx(1 / 3)


def test_pope_metrics_rejects_bad_truth_and_lengths():
    with pytest.raises(ValueError, match="truth 0"):
        pope_metrics(["yes"], ["red"])
    with pytest.raises(ValueError, match="lengths must match"):
        pope_metrics(["yes", "no"], ["yes"])


# --------------------------------------------------------------------------------------------------
# grounding_metrics


def test_grounding_metrics_known_boxes():
    ref = [0, 0, 100, 100]
    preds = [
        "<box>0,0,100,100</box>",  # IoU 1
        "It is at <box> 0, 0, 100, 50 </box>.",  # IoU 0.5 exactly: counts for acc50
        "<box>50,50,150,150</box>",  # IoU 2500 / 17500 = 1/7
        "<box>10,10,10,50</box>",  # empty box: unparseable
        "somewhere on the left",  # unparseable
        None,  # unparseable
    ]
    m = grounding_metrics(preds, [ref] * len(preds))
    assert m["n"] == 6
    assert m["unparseable"] == 3
    assert m["acc50"] == pytest.approx(2 / 6)
    assert m["miou"] == pytest.approx((1 + 0.5 + 1 / 7) / 6)


def test_grounding_metrics_empty_and_lengths():
    assert grounding_metrics([], []) == {"acc50": 0.0, "miou": 0.0, "n": 0, "unparseable": 0}
    with pytest.raises(ValueError, match="lengths must match"):
        grounding_metrics(["<box>0,0,1,1</box>"], [])


# --------------------------------------------------------------------------------------------------
# score


def _records():
    return [
        {"id": "0", "question": "What color is the star?", "answer": "red", "type": "color"},
        {"id": "1", "question": "What shape is the red object?", "answer": "star", "type": "shape"},
        {"id": "2", "question": "How many objects are there?", "answer": "3", "type": "count"},
        {"id": "3", "question": "How many stars are there?", "answer": "2", "type": "count"},
        {"id": "4", "question": "Is there a red star?", "answer": "yes", "type": "exists"},
        {"id": "5", "question": "Is there a blue oval?", "answer": "no", "type": "exists", "negative": "random"},
        {"id": "6", "question": "Is there a red oval?", "answer": "no", "type": "exists", "negative": "popular"},
        {"id": "7", "question": "Is the star left or right of the oval?", "answer": "left", "type": "spatial"},
        {"id": "8", "question": "Which is bigger, ...?", "answer": "red star", "type": "size"},
        {"id": "9", "question": "What is at <box>1,2,3,4</box>?", "answer": "blue circle", "type": "identify"},
        {
            "id": "10",
            "question": "Where is the red star?",
            "answer": "<box>0,0,100,100</box>",
            "type": "grounding",
            "box": [0, 0, 100, 100],
        },
        # No "box" key: the reference is parsed from the answer.
        {"id": "11", "question": "Locate the oval.", "answer": "<box>500,500,600,600</box>", "type": "grounding"},
    ]


_PREDS = [
    "Red.",  # right
    "a star",  # right
    "three",  # right
    "4",  # wrong
    "Yes, there is.",  # wrong for exact match, "yes" for POPE
    "no",  # right
    "yes",  # wrong
    "left",  # right
    "the red star",  # right
    "green circle",  # wrong
    "<box>0,0,100,50</box>",  # IoU 0.5
    "no idea",  # unparseable box
]


def test_score_end_to_end():
    r = score(_records(), _PREDS)
    assert r["n_samples"] == 12
    assert r["n_by_type"] == {
        "color": 1,
        "shape": 1,
        "count": 2,
        "exists": 3,
        "spatial": 1,
        "size": 1,
        "identify": 1,
        "grounding": 2,
    }
    assert r["vqa_accuracy"] == pytest.approx(6 / 10)
    by_type = r["vqa_accuracy_by_type"]
    assert list(by_type) == ["color", "shape", "count", "exists", "spatial", "size", "identify"]
    assert by_type["color"] == 1.0
    assert by_type["shape"] == 1.0
    assert by_type["count"] == pytest.approx(0.5)
    assert by_type["exists"] == pytest.approx(1 / 3)
    assert by_type["spatial"] == 1.0
    assert by_type["size"] == 1.0
    assert by_type["identify"] == 0.0
    assert "grounding" not in by_type

    # POPE over the exists questions: yes/yes (tp), no/no (tn), yes/no (fp).
    pope = r["pope"]
    assert pope["n"] == 3 and pope["unparseable"] == 0
    assert pope["accuracy"] == pytest.approx(2 / 3)
    assert pope["precision"] == pytest.approx(1 / 2)
    assert pope["recall"] == 1.0
    assert pope["f1"] == pytest.approx(2 / 3)
    assert pope["yes_ratio"] == pytest.approx(2 / 3)

    g = r["grounding"]
    assert g == {"acc50": pytest.approx(0.5), "miou": pytest.approx(0.25), "n": 2, "unparseable": 1}


def test_score_by_negative_split():
    pope = score(_records(), _PREDS)["pope"]
    assert set(pope["by_negative"]) == {"random", "popular"}
    # Each split: the positive (right) plus that kind's negatives.
    rnd = pope["by_negative"]["random"]
    assert rnd == _pope(1.0, 1.0, 1.0, 1.0, 0.5, 2, 0)
    pop = pope["by_negative"]["popular"]
    assert pop["n"] == 2
    assert pop["accuracy"] == pytest.approx(0.5)
    assert pop["precision"] == pytest.approx(0.5)
    assert pop["recall"] == 1.0
    assert pop["f1"] == pytest.approx(2 / 3)
    assert pop["yes_ratio"] == 1.0


def test_score_without_negative_kinds():
    recs = [{"answer": "yes", "type": "exists"}, {"answer": "no", "type": "exists"}]
    r = score(recs, ["yes", "maybe"])
    assert r["pope"]["by_negative"] == {}
    assert r["pope"]["unparseable"] == 1
    assert r["pope"]["accuracy"] == pytest.approx(0.5)


def test_score_absent_types():
    r = score([{"answer": "red", "type": "color"}], ["red"])
    assert r["vqa_accuracy"] == 1.0
    assert r["vqa_accuracy_by_type"] == {"color": 1.0}
    assert "pope" not in r and "grounding" not in r

    g = score([{"answer": "<box>0,0,10,10</box>", "type": "grounding"}], ["<box>0,0,10,10</box>"])
    assert "vqa_accuracy" not in g and g["vqa_accuracy_by_type"] == {}
    assert g["grounding"]["acc50"] == 1.0

    empty = score([], [])
    assert empty == {"n_samples": 0, "n_by_type": {}, "vqa_accuracy_by_type": {}}


def test_score_errors():
    with pytest.raises(ValueError, match="lengths must match"):
        score(_records(), _PREDS[:-1])
    with pytest.raises(ValueError, match="record 0"):
        score([{"answer": "red"}], ["red"])
    with pytest.raises(ValueError, match="grounding record 0"):
        score([{"answer": "top left", "type": "grounding"}], ["<box>0,0,1,1</box>"])


# --------------------------------------------------------------------------------------------------
# markdown_table


def test_markdown_table_single_column():
    table = markdown_table(score(_records(), _PREDS))
    lines = table.splitlines()
    assert lines[0] == "| metric | test |"
    assert lines[1] == "|---|---:|"
    assert "| VQA accuracy | 0.600 |" in lines
    assert "| VQA accuracy: count | 0.500 |" in lines
    assert "| VQA accuracy: exists | 0.333 |" in lines
    assert "| POPE F1 | 0.667 |" in lines
    assert "| POPE accuracy | 0.667 |" in lines
    assert "| POPE yes-ratio | 0.667 |" in lines
    assert "| Grounding acc@0.5 | 0.500 |" in lines
    assert "| Grounding mIoU | 0.250 |" in lines
    assert len(lines) == 2 + 1 + 7 + 3 + 2


def test_markdown_table_compositional_with_missing():
    test = score(_records(), _PREDS)
    # A compositional split with only color and exists questions: every other metric is missing.
    comp = score(
        [{"answer": "red", "type": "color"}, {"answer": "no", "type": "exists", "negative": "random"}],
        ["blue", "no"],
    )
    lines = markdown_table(test, {"compositional": comp}).splitlines()
    assert lines[0] == "| metric | test | compositional |"
    assert lines[1] == "|---|---:|---:|"
    assert "| VQA accuracy | 0.600 | 0.500 |" in lines
    assert "| VQA accuracy: color | 1.000 | 0.000 |" in lines
    assert "| VQA accuracy: identify | 0.000 | – |" in lines
    assert "| POPE accuracy | 0.667 | 1.000 |" in lines
    assert "| POPE F1 | 0.667 | 0.000 |" in lines
    assert "| Grounding acc@0.5 | 0.500 | – |" in lines
    assert "| Grounding mIoU | 0.250 | – |" in lines


def test_markdown_table_one_column_per_held_out_split():
    test = score([{"answer": "red", "type": "color"}], ["red"])
    extra = {"compositional": score([{"answer": "red", "type": "color"}], ["blue"]),
             "variants": score([{"answer": "red", "type": "color"}], ["red"])}
    lines = markdown_table(test, extra).splitlines()
    assert lines[0] == "| metric | test | compositional | variants |"
    assert "| VQA accuracy: color | 1.000 | 0.000 | 1.000 |" in lines


def test_markdown_table_type_only_in_compositional():
    test = score([{"answer": "red", "type": "color"}], ["red"])
    comp = score([{"answer": "left", "type": "spatial"}], ["left"])
    lines = markdown_table(test, {"compositional": comp}).splitlines()
    assert "| VQA accuracy: color | 1.000 | – |" in lines
    assert "| VQA accuracy: spatial | – | 1.000 |" in lines
    assert "| POPE F1 | – | – |" in lines


def test_score_and_table_of_two_image_questions():
    records = [
        {"answer": "first", "type": "multi_count"}, {"answer": "second", "type": "multi_count"},
        {"answer": "yes", "type": "multi_both"}, {"answer": "no", "type": "multi_both", "negative": "one_image"},
        {"answer": "red star", "type": "multi_added"},
    ]
    r = score(records, ["The first.", "first", "yes", "Yes", "a red star"])
    assert list(r["vqa_accuracy_by_type"]) == ["multi_count", "multi_both", "multi_added"]
    assert r["vqa_accuracy_by_type"] == {"multi_count": 0.5, "multi_both": 0.5, "multi_added": 1.0}
    assert r["vqa_accuracy"] == pytest.approx(3 / 5) and "pope" not in r  # yes/no about two images is not POPE
    test = score([{"answer": "red", "type": "color"}], ["red"])
    lines = markdown_table(test, {"multi_test": r}, name="val").splitlines()
    assert lines[0] == "| metric | val | multi_test |"
    assert lines[2:6] == ["| VQA accuracy | 1.000 | 0.600 |", "| VQA accuracy: color | 1.000 | – |",
                          "| VQA accuracy: multi_count | – | 0.500 |", "| VQA accuracy: multi_both | – | 0.500 |"]
    assert "| VQA accuracy: multi_added | – | 1.000 |" in lines
