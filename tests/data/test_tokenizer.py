"""Tokenizers: SentencePiece BPE by default (§5.1), unigram on request, the special ids every part
of the library takes from the tokenizer, and the flags that choose them."""

import numpy as np
import pytest
from sentencepiece import sentencepiece_model_pb2

from transformer.config import ConfigError
from transformer.data.tokenizer import CharTokenizer, SentencePieceTokenizer, load_tokenizer
from transformer.run.trainer import make_tokenizer
from transformer.tasks import TranslateConfig, TranslateTask
from transformer.training import TrainConfig

WORDS = ["the", "dog", "runs", "over", "a", "green", "meadow", "der", "hund", "läuft", "über", "eine", "grüne",
         "wiese", "children", "kinder", "play", "spielen", "water", "wasser"]
SENTENCES = [" ".join(np.random.default_rng(i).choice(WORDS, 3 + i % 7)) for i in range(400)]


def _model_type(tokenizer: SentencePieceTokenizer) -> str:
    proto = sentencepiece_model_pb2.ModelProto()
    with open(tokenizer.model_file, "rb") as f:
        proto.ParseFromString(f.read())
    return sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)


def _check_ids_and_round_trip(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert [tok.processor.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    for text in SENTENCES[:20] + ["über die grüne wiese"]:
        ids = tok.encode(text)
        assert min(ids) >= 4  # no special id inside a sentence (character_coverage=1.0: no UNK)
        assert tok.decode(ids) == text
        # As search returns it: begin token, the sentence, the end token, then padding and leftovers.
        assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id, ids[0]]) == text


def test_sentencepiece_trains_byte_pair_encoding_by_default(tmp_path):
    tok = SentencePieceTokenizer.train(SENTENCES, 120, str(tmp_path))
    assert _model_type(tok) == "BPE"
    assert tok.vocab_size == 120
    _check_ids_and_round_trip(tok)
    again = load_tokenizer(str(tmp_path))  # what a resumed run or translate.py reads
    assert _model_type(again) == "BPE" and again.encode(SENTENCES[0]) == tok.encode(SENTENCES[0])
    assert (again.pad_id, again.bos_id, again.eos_id) == (0, 2, 3)


def test_bpe_vocab_size_is_an_upper_limit(tmp_path):
    # hard_vocab_limit=False holds for BPE too: a corpus too small for 5000 pieces gives fewer, no error.
    tok = SentencePieceTokenizer.train(SENTENCES, 5000, str(tmp_path))
    assert _model_type(tok) == "BPE" and 4 < tok.vocab_size < 5000
    _check_ids_and_round_trip(tok)


def test_unigram_on_request(tmp_path):
    tok = SentencePieceTokenizer.train(SENTENCES, 60, str(tmp_path), model_type="unigram")
    assert _model_type(tok) == "UNIGRAM"
    _check_ids_and_round_trip(tok)
    with pytest.raises(ValueError, match="model_type must be one of bpe, unigram"):
        SentencePieceTokenizer.train(SENTENCES, 60, str(tmp_path / "x"), model_type="wordpiece")


@pytest.mark.parametrize("tokenizer_type", ["bpe", "unigram"])
def test_a_run_trains_the_tokenizer_type_it_is_given(tmp_path, tokenizer_type):
    config = TrainConfig(tokenizer_type=tokenizer_type)
    task = TranslateTask(TranslateConfig(dataset="wmt14_translate/de-en"), config)
    task.train_pairs = list(zip(SENTENCES[::2], SENTENCES[1::2]))
    tok = make_tokenizer(config, task, 100, str(tmp_path))
    assert _model_type(tok) == tokenizer_type.upper()


def test_tokenizer_type_is_validated_and_bpe_by_default():
    assert TrainConfig().tokenizer_type == "bpe"
    with pytest.raises(ConfigError, match="tokenizer_type must be one of bpe, unigram; got 'wordpiece'"):
        TrainConfig(tokenizer_type="wordpiece")


def test_char_tokenizer_special_ids():
    tok = CharTokenizer("xyz")
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.encode("zx?") == [6, 4, tok.unk_id]
    assert tok.decode([tok.bos_id, 6, 4, tok.eos_id, 5]) == "zx"


def test_train_py_flags():
    # The pad id is the tokenizer's: train.py offers no --pad_id that could disagree with it.
    import train

    parser = train.build_parser()
    assert parser.parse_args(["--tokenizer_type", "unigram"]).tokenizer_type == "unigram"
    assert parser.parse_args([]).tokenizer_type is None  # keeps TrainConfig's default, "bpe"
    for bad in (["--pad_id", "5"], ["--tokenizer_type", "wordpiece"]):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(bad)
        assert exit_info.value.code == 2


def test_pieces_name_every_id_special_ones_included(tmp_path):
    chars = CharTokenizer("ab")
    assert chars.pieces([2, 4, 5, 3, 0]) == ["<s>", "a", "b", "</s>", "<pad>"]
    spm_tok = SentencePieceTokenizer.train(["ein hund", "zwei katzen", "der mann"] * 20, 40, str(tmp_path))
    ids = spm_tok.encode("ein hund") + [spm_tok.eos_id]
    pieces = spm_tok.pieces(ids)
    assert pieces[-1] == "</s>" and spm_tok.processor.decode_pieces(pieces[:-1]) == "ein hund"
