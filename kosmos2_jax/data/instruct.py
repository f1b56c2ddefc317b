"""Instruction-tuning examples (reference §3.3, Table 8): LLaVA-style conversations and grounded
instructions built from GRIT records with the Table 9 templates. Loss falls on the answers only.

- LLaVA-Instruct JSON: `[{"id", "image": "file.jpg", "conversations": [{"from": "human", "value":
  "<image>\\nWhat is ...?"}, {"from": "gpt", "value": "..."}, ...]}]`; each turn becomes
  "Question: {human} Answer:" + " {gpt}" (the paper's VQA prompt form), turns concatenated.
- Grounded instructions from a GRIT record: one expression (a span kept by `select_spans`) and its
  boxes, either asking for the box (`<grounding><phrase>{expression}</phrase>` -> `<object>..</object>`)
  or, with a Table 9 template, for the expression ("What is <phrase> it</phrase><object>..</object>?
  It is" -> " {expression}.").
- Language instructions, text only (Table 8's 117 sequences per step): FLANv2 mixture files as
  released, JSONL `{"inputs": ..., "targets": ...}` (one example per line; other fields ignored), and
  Unnatural Instructions (`core_data.jsonl` / `full_data.jsonl`: `{"instruction": ..., "instances":
  [{"instruction_with_input": ..., "input": ..., "output": ...}]}`, one example per instance). The
  prompt is the instruction with its input as released, the answer its target/output.
"""

from __future__ import annotations

import json
import os

import numpy as np

from kosmos2_jax.format import grounding
from kosmos2_jax.format.processor import GroundedSequence, Kosmos2Processor
from kosmos2_jax.utils.errors import UsageError

# Table 9: (question with {obj} for `<object>..</object>`, answer prefix); the answer is
# "{prefix} {expression}.".
REG_TEMPLATES = (
    ("What is <phrase> it</phrase>{obj}?", "It is"),
    ("What is <phrase> this</phrase>{obj}?", "This is"),
    ("Describe <phrase> this object</phrase>{obj}.", "This object is"),
    ("<phrase> It</phrase>{obj}", "is"),
    ("<phrase> This</phrase>{obj}", "is"),
    ("<phrase> The object</phrase>{obj}", "is"),
)


def instruction_sequence(processor: Kosmos2Processor, turns, with_image: bool = True) -> GroundedSequence:
    """turns: [(prompt text, answer text)] -> ids `<s> [<image> slots </image>] p1 a1 p2 a2 ... </s>`
    with the loss on the answers' tokens and `</s>`. Each piece is tokenized on its own, as a
    model sees a prompt and then writes its continuation."""
    tok = processor.tokenizer
    ids, mask = processor.encode_prompt("", with_image, add_special_tokens=True)
    loss = [0] * len(ids)
    for prompt, answer in turns:
        p = tok.encode(prompt.strip()) if prompt.strip() else []
        a = tok.encode(answer.strip())
        ids += p + a
        mask += [0] * (len(p) + len(a))
        loss += [0] * len(p) + [1] * len(a)
    ids, mask, loss = ids + [tok.eos_id], mask + [0], loss + [1]
    text = " ".join(f"{p} {a}" for p, a in turns)
    return GroundedSequence(np.asarray(ids, np.int32), np.asarray(loss, np.int32), np.asarray(mask, np.int32), text)


def grounded_instruction_turn(expression: str, boxes, num_bins: int, rng: np.random.Generator,
                              formula: str = "train") -> tuple[str, str]:
    """One (prompt, answer) about an expression and its boxes: half the time "where is it"
    (`<grounding><phrase>..</phrase>` -> `<object>..</object>`), else a random Table 9 template."""
    obj = grounding.object_string([grounding.box_to_patch_pair(b, num_bins, formula) for b in boxes])
    if rng.random() < 0.5:
        return f"<grounding><phrase>{expression.strip()}</phrase>", obj
    question, prefix = REG_TEMPLATES[rng.integers(len(REG_TEMPLATES))]
    return question.format(obj=obj), f"{prefix} {expression.strip()}."


def llava_turns(conversations) -> list[tuple[str, str]]:
    """LLaVA `conversations` -> [(prompt, answer)], human/gpt alternating; `<image>` markers removed."""
    turns, question = [], None
    for message in conversations:
        value = str(message.get("value", "")).replace("<image>", "").strip()
        if message.get("from") == "human":
            question = value
        elif message.get("from") == "gpt" and question is not None:
            turns.append((f"Question: {question} Answer:", value))
            question = None
    return turns


def load_llava(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LLaVA instruction file not found: {path!r}")
    with open(path) as f:
        records = json.load(f)
    if not isinstance(records, list):
        raise UsageError(f"{path}: expected a JSON list of conversations")
    return records


LANGUAGE_INSTRUCTION_KINDS = ("flan", "unnatural_instructions")


def load_language_instructions(path: str, kind: str) -> list[dict]:
    """A FLANv2 or Unnatural Instructions JSONL file -> [{"prompt", "answer"}], one per example
    (Unnatural Instructions: one per instance). Lines that are not JSON objects become
    `{"bad": reason}` records, which the pipeline counts as bad."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{kind} file not found: {path!r}")
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                out.append({"bad": "not a JSON object"})
                continue
            if not isinstance(record, dict):
                out.append({"bad": "not a JSON object"})
            elif kind == "flan":
                out.append({"prompt": record.get("inputs", ""), "answer": record.get("targets", "")})
            else:
                instruction = str(record.get("instruction", ""))
                for instance in record.get("instances") or [{}]:
                    prompt = instance.get("instruction_with_input") or "\n".join(
                        x for x in (instruction, str(instance.get("input", ""))) if x.strip())
                    out.append({"prompt": prompt, "answer": instance.get("output", "")})
    return out
