"""Prompt layout as big_vision builds it; special pieces by name."""
import numpy as np
import pytest


def test_special_ids(tokenizer):
  assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id) == (0, 1, 2)
  assert tokenizer.sp.unk_id() == 3
  locs, segs = tokenizer.loc_ids(), tokenizer.seg_ids()
  assert len(set(locs)) == 1024 and len(set(segs)) == 128
  assert tokenizer.sp.IdToPiece(int(locs[123])) == "<loc0123>"
  assert tokenizer.encode("<loc0007><seg100>") == [int(locs[7]), int(segs[100])]
  with pytest.raises(KeyError, match="<loc9999>"):
    tokenizer.piece_id("<loc9999>")


def test_prompt_layout(tokenizer):
  tokens, mask_ar = tokenizer.prompt("caption en")
  sep = tokenizer.encode("\n")
  assert len(sep) == 1
  expected = [tokenizer.bos_id] + tokenizer.encode("caption en") + sep
  assert tokens.tolist() == expected
  assert mask_ar.tolist() == [0] * len(expected)
  # The separator is tokenized on its own, never merged with the prefix.
  tokens, _ = tokenizer.prompt("answer en what is this ?\n")
  assert tokens.tolist()[-2:] == tokenizer.encode("\n") * 2


def test_forced_answer_start_is_causal(tokenizer):
  tokens, mask_ar = tokenizer.prompt("detect cat", answer_start="<loc0001>")
  assert tokens[-1] == tokenizer.piece_id("<loc0001>")
  assert mask_ar.tolist()[-1] == 1 and mask_ar.tolist()[:-1] == [0] * (len(tokens) - 1)


def test_decode_round_trip(tokenizer):
  text = "<loc0010><loc0020><loc0900><loc1000> cat ; <loc0001><loc0002><loc0003><loc0004> dog"
  assert tokenizer.decode(tokenizer.encode(text)) == text
  assert isinstance(tokenizer.decode(np.array([5, 6, 7])), str)
