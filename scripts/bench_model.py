"""The quick dense comparison: ByteModel against transformers' LlamaForCausalLM at the same config and weights,
eager and fp32, training and batch-1 generation: `scripts/benchmark.py --models dense --quick`, whose options
can follow (`python scripts/bench_model.py --rounds 5`)."""

import sys

from benchmark import main

if __name__ == "__main__":
    main(["--models", "dense", "--quick", *sys.argv[1:]])
