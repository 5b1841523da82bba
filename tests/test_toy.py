from transformers import AutoModelForCausalLM, AutoTokenizer

from reinforce_lm import toy


def test_tiny_models_load_with_auto_classes(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = tok("a?", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "a?"
    assert model(ids).logits.shape == (1, 2, len(tok))


def test_chat_template_renders(tokenizer):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "a?"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "u:a?a:"


def test_letter_reward():
    assert toy.letter_reward(["a?", "b?"], ["aaab", ""]) == [0.75, 0.0]
    assert toy.letter_reward(["x"], ["cc"], letter=["c"]) == [1.0]
