"""Prompt files: cleaned with a message, read from text or JSONL, embeddings cached once."""

import json

import pytest
import torch

from tdm.families.diffusers.prompts import cached_embeddings, read_prompts


def test_text_file_drops_empty_and_duplicates_and_truncates(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n  a   cat \nx" + "y" * 50 + "\nthe dog\n")
    with pytest.warns(UserWarning, match="dropped 1 empty and 1 duplicate prompts, truncated 1"):
        prompts = read_prompts(f, max_chars=20)
    assert prompts == ["a cat", "x" + "y" * 19, "the dog"]


def test_jsonl_and_errors(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a"}) + "\n\n" + json.dumps({"prompt": "b", "id": 2}) + "\n")
    assert read_prompts(f) == ["a", "b"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "a"}) + "\n")
    with pytest.raises(ValueError, match="no 'prompt' field"):
        read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no usable prompt"):  # the error alone, no warning before it
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError):
        read_prompts(tmp_path / "missing.txt")


def test_embeddings_are_encoded_once_with_the_empty_prompt_last(tmp_path):
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return {"e": torch.tensor([[float(len(t))] for t in texts])}

    first = cached_embeddings(["ab", "c"], encode, tmp_path, key="m")
    again = cached_embeddings(["ab", "c"], encode, tmp_path, key="m")
    assert calls == [["ab", "c", ""]] and torch.equal(first["e"], again["e"])
    cached_embeddings(["ab", "c"], encode, tmp_path, key="another model")  # a new key is a new cache
    assert len(calls) == 2
