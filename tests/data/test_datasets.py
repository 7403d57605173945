import pytest
import torch

from ds_realloc.data.datasets import ChatFormatter, TokenizedSequence, pad_sequences, tokenize_records
from ds_realloc.data.records import Record
from ds_realloc.models.tokenizer import byte_level_tokenizer
from ds_realloc.utils.errors import DataError


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


def test_answered_masks_exactly_the_answer_and_eos(tokenizer):
    fmt = ChatFormatter(tokenizer)
    seq = fmt.answered("What is 2 + 3?", "2 + 3 = 5")
    prompt_ids = [t for t, m in zip(seq.input_ids, seq.loss_mask) if not m]
    answer_ids = [t for t, m in zip(seq.input_ids, seq.loss_mask) if m]
    assert list(seq.loss_mask) == sorted(seq.loss_mask)  # one prompt part, then one answer part
    assert tokenizer.decode(prompt_ids) == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(answer_ids) == "2 + 3 = 5<|im_end|>" and answer_ids[-1] == tokenizer.eos_token_id


def test_conversation_trains_on_every_assistant_turn_only(tokenizer):
    fmt = ChatFormatter(tokenizer)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
                {"role": "assistant", "content": "A2"}]
    seq = fmt.conversation(messages, "x:1")
    trained = "".join(tokenizer.decode([t]) for t, m in zip(seq.input_ids, seq.loss_mask) if m)
    assert trained == "A1<|im_end|>\nA2<|im_end|>\n"
    with pytest.raises(DataError, match="x:2: the last message must be the assistant's answer"):
        fmt.conversation(messages[:2], "x:2")


def test_raw_text_without_template(tokenizer):
    fmt = ChatFormatter(tokenizer, use_chat_template=False)
    seq = fmt.answered("Q ", "A")
    assert tokenizer.decode(seq.input_ids) == "Q A<|im_end|>" and seq.loss_mask == (0, 0, 1, 1)


def test_records_errors_and_skipping(tokenizer):
    fmt = ChatFormatter(tokenizer)
    records = [Record("d.jsonl:1", {"prompt": "p", "answer": "a"}),
               Record("d.jsonl:2", {"prompt": "p"}),
               Record("d.jsonl:3", {"prompt": "p" * 200, "answer": "a"})]
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'answer' is missing"):
        tokenize_records(records, "sft", fmt, max_len=100)
    with pytest.raises(DataError, match=r"d\.jsonl:3: sample has \d+ tokens, more than data.max_seq_len=100"):
        tokenize_records([records[0], records[2]], "sft", fmt, max_len=100)
    kept = tokenize_records(records, "sft", fmt, max_len=100, skip_bad_samples=True)
    assert len(kept) == 1
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'chosen' is missing"):
        tokenize_records(records[:1], "pairs", fmt, max_len=100)


def test_prompt_samples_keep_the_reference_answer(tokenizer):
    fmt = ChatFormatter(tokenizer)
    [sample] = tokenize_records([Record("p:1", {"prompt": "What is 1 + 1?", "answer": "2"})], "prompts", fmt, 100)
    assert sample.answer == "2" and list(sample.prompt_ids) == fmt.prompt_ids("What is 1 + 1?")


def test_missing_chat_template_is_a_clear_error(tokenizer):
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="data.chat_template is true but the model's tokenizer has no chat template"):
        ChatFormatter(tokenizer)


def test_pad_sequences_right_pads():
    batch = pad_sequences([TokenizedSequence((5, 6, 7), (0, 1, 1)), TokenizedSequence((8,), (1,))], pad_id=0)
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert torch.equal(batch["loss_mask"], torch.tensor([[0, 1, 1], [1, 0, 0]]))
