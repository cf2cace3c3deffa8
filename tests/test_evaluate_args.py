"""evaluate_model checks its own arguments, as `entrodrop eval` does (fresh-eyes findings)."""

import pytest
from helpers import char_tokenizer, tiny_model

from entrodrop_fast.evaluate.pipeline import evaluate_model


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"windows": 0}, "windows must be an integer >= 1, got 0"),
        ({"items": 0}, "items must be an integer >= 1, got 0"),
        ({"seq_len": 1}, "seq_len must be an integer >= 2, got 1"),
        ({"seq_len": 4096}, "seq_len is 4096 tokens, beyond the"),
    ],
)
def test_bad_arguments_name_the_keyword(kw, words):
    model = tiny_model("llama", max_position_embeddings=256)
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        evaluate_model(model, char_tokenizer(), speed=False, **kw)
