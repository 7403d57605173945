from ds_realloc.data.tasks import EVAL_PROBLEMS, builtin_records, final_number


def test_arith_splits_are_deterministic_disjoint_and_complete():
    train = builtin_records("builtin:arith", "train", "prompts")
    evaluation = builtin_records("builtin:arith", "eval", "prompts")
    assert len(evaluation) == EVAL_PROBLEMS and len(train) + len(evaluation) == 300
    assert not {r.fields["prompt"] for r in train} & {r.fields["prompt"] for r in evaluation}
    assert [r.fields for r in train] == [r.fields for r in builtin_records("builtin:arith", "train", "prompts")]


def test_arith_answers_are_right_and_pairs_are_wrong():
    for record in builtin_records("builtin:arith", "train", "prompts"):
        a, op, b = record.fields["prompt"].removeprefix("What is ").removesuffix("?").split()
        assert int(record.fields["answer"]) == eval(f"{a} {op} {b}")  # noqa: S307 - our own generated digits
    pairs = builtin_records("builtin:arith", "train", "pairs")
    assert len(pairs) == 236
    for record in pairs:
        assert final_number(record.fields["chosen"]) != final_number(record.fields["rejected"])
        assert record.fields["chosen"].split(" = ")[0] == record.fields["rejected"].split(" = ")[0]


def test_final_number():
    assert final_number("3 - 9 = -6") == "-6"
    assert final_number("The answer is 1,024.") == "1024"
    assert final_number("no digits") is None
