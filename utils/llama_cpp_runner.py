"""Running an exported GGUF file in llama.cpp (through llama-cpp-python, a test-time reference): the export's tests
check its logits and tokens against ours, and the benchmark times it beside ours."""

from pathlib import Path


def open_gguf(path: Path, context: int, threads: int, all_logits: bool = False):
    """The file as a `llama_cpp.Llama`. Keys and values are cached in f32 (llama.cpp's default is f16), so that an f32
    file computes in f32 throughout. Weight repacking is off: with it, llama.cpp decoding these q8_0 files crashes on
    an Intel Xeon with AMX."""
    import llama_cpp

    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def without_repacking():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = without_repacking
    try:
        return llama_cpp.Llama(str(path), n_ctx=context, logits_all=all_logits, verbose=False, n_threads=threads,
                               n_threads_batch=threads, seed=0, type_k=0, type_v=0)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults


def greedy(llm, prompt: list[int], new_tokens: int) -> list[int]:
    """Exactly `new_tokens` tokens after `prompt` from llama.cpp's greedy sampler (the end-of-sequence token does not
    stop it). The cache is cleared first: `generate` would otherwise reuse a cached prefix of the prompt."""
    llm.reset()
    tokens = []
    for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0):
        tokens.append(token)
        if len(tokens) == new_tokens:
            return tokens
