"""QLoRA: LoRA (r=16) on every decoder linear of a base model stored in 4-bit NF4.

    jft train --config configs/qlora_llama.py --workdir runs/qlora \
        --config.model.path=/path/to/Llama-3.1-8B --config.data.train=/path/to/train.jsonl

The linear kernels are quantized as they are read (NF4, blocks of 64, double-quantized
scales: about 4.1 bits per weight); embeddings, norms and lm_head stay in bfloat16. The run
writes the adapter in Hugging Face PEFT format to runs/qlora/adapter and, dequantized and
merged, the full model to runs/qlora/hf (export.dtype).
"""

from jft.config import default_config


def get_config():
    c = default_config()
    c.model.path = ""  # required: a Hugging Face model folder
    c.model.dtype = "bfloat16"  # unquantized parameters (embeddings, norms, lm_head) and the LoRA weights
    c.model.compute_dtype = "bfloat16"
    c.model.quantize = "nf4"  # 4-bit NormalFloat base weights
    c.data.train = ""  # required: training records
    c.data.seq_len = 1024
    c.train.batch_size = 16
    c.train.epochs = 2
    c.peft.methods = ("lora",)
    c.peft.lora.r = 16  # rank
    c.peft.lora.alpha = 32.0  # scale alpha / r = 2
    c.peft.lora.dropout = 0.05  # on the LoRA input while training
    c.optim.learning_rate = 2e-4
    c.optim.bf16_update = "kahan"  # bf16 LoRA weights keep small updates (+2 bytes per adapter weight)
    c.export.dtype = "bfloat16"  # the merged, dequantized model
    return c
