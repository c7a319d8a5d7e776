"""Base config: every key llm_jax reads is declared here, once, with a comment.

Run (trains a 1k-piece SentencePiece tokenizer and a 1M-parameter LLaMA-style
decoder on the embedded corpus, the Python standard library's own sources):

    python -m llm_jax.train --config=configs/base.py

Should reach, on 2 CPU cores (measured 2026-11-25, Python 3.11.7): validation
loss 2.77 nats/token (perplexity 16) after 1000 steps of 16 x 256 tokens, below
half the corpus's unigram entropy (5.60 / 2 = 2.80), in about 7.5 minutes with
data preparation, at under 2 GiB of memory.

The sizes are chosen for that budget: at ~6e13 FLOPs (8 minutes of a 2-core
CPU) a ~1M-parameter model on ~4M tokens learns more than a bigger one on
fewer, and a 1k vocabulary keeps the LM head from dominating the compute.
Other presets import this file and override only what differs.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the base config with every key llm_jax reads."""
  c = ml_collections.ConfigDict()
  c.name = 'base'  # Run name: the default workdir is runs/<name>.
  c.seed = 0  # Seeds parameter init, data order and sampling.
  # Start a fresh run from these weights (continued pre-training, SFT, LoRA):
  # a workdir (its newest checkpoint) or a step directory in one
  # (RUN/checkpoints/500). Only the parameters come over (the model config
  # must match); data, schedule and optimizer state are this run's own. If
  # tokenizer.path is '' the source's tokenizer.model is used. '': off. A run
  # that has its own checkpoints resumes from them and ignores this.
  c.init_from = ''
  # What the run optimises (llm_jax/training/objectives.py, docs/alignment.md):
  # 'lm' (next-token, masked-token or SFT cross-entropy, by model.kind and
  # data.source), 'reward' (a reward model on preference pairs), 'dpo' or
  # 'orpo' (preference pairs), 'grpo' (prompts, on-policy rollouts).
  # 'reward', 'dpo' and 'orpo' read data.source='preference'; 'grpo' reads
  # data.source='prompts'.
  c.objective = 'lm'

  # ---- Data: raw text -> cleaned documents -> token shards (see llm_jax/data/).
  c.data = ml_collections.ConfigDict()
  # Where documents come from: 'default' (the Python standard library's own
  # .py files, no download), 'text' (plain-text files), 'jsonl' (one JSON
  # object per line) or 'tfds' (a TensorFlow Datasets name). Conversations:
  # 'sft' (chat JSONL), 'preference' (pairs) and 'prompts' (for GRPO).
  c.data.source = 'default'
  # For 'text' and 'jsonl': comma-separated file globs, e.g. 'data/*.txt'.
  c.data.paths = ''
  c.data.jsonl_field = 'text'  # For 'jsonl': the field that holds the text.
  c.data.tfds_name = ''  # For 'tfds': dataset name, e.g. 'lm1b'.
  c.data.tfds_split = 'train'  # For 'tfds': the split to read.
  c.data.tfds_field = 'text'  # For 'tfds': the feature that holds the text.
  c.data.max_documents = 0  # Read at most this many documents (0: all).
  c.data.min_doc_chars = 64  # Cleaning drops documents shorter than this.
  c.data.val_fraction = 0.02  # Share of documents (by content hash) held out.
  c.data.seq_len = 256  # Tokens per training window (the model's context).
  # Tokenizer, token shards and manifests are cached here by content hash and
  # shared by runs. '' means $LLM_JAX_CACHE, else ~/.cache/llm_jax.
  c.data.cache_dir = ''
  c.data.num_threads = 2  # Threads for tokenizer training and encoding.

  # ---- Tokenizer: trained on the cleaned training documents, or loaded.
  c.tokenizer = ml_collections.ConfigDict()
  # An existing tokenizer to use instead of training: a SentencePiece .model,
  # or a Hugging Face tokenizer.json, vocab.txt (WordPiece), vocab.json (with
  # merges.txt beside it) or a directory holding them.
  c.tokenizer.path = ''
  # What to train: 'sentencepiece' (lossless BPE/unigram, tensorflow-text runs
  # it inside exports), 'bytelevel_bpe' (Hugging Face byte-level BPE, as
  # GPT-2 and RoBERTa: <s> <pad> </s> <unk>, and <mask> for an encoder) or
  # 'wordpiece' (BERT: [PAD] [UNK] [CLS] [SEP], and [MASK] for an encoder).
  c.tokenizer.kind = 'sentencepiece'
  c.tokenizer.vocab_size = 1024  # Pieces in the trained vocabulary.
  c.tokenizer.model_type = 'bpe'  # SentencePiece only: 'bpe' or 'unigram'.
  c.tokenizer.lowercase = True  # WordPiece only: lowercase and strip accents (BERT uncased).
  # Share of characters the vocabulary must cover; 0.9995 keeps rare CJK
  # characters as pieces while byte fallback covers the rest.
  c.tokenizer.character_coverage = 0.9995
  c.tokenizer.input_sentence_size = 2_000_000  # Lines sampled for training.

  # ---- Model: a decoder-only Transformer (LLaMA-style by default).
  c.model = ml_collections.ConfigDict()
  # 'decoder' (causal next-token LM) or 'encoder' (bidirectional, masked LM
  # with 15% masking and the 80/10/10 rule; see configs/mlm.py).
  c.model.kind = 'decoder'
  c.model.num_layers = 4  # Transformer blocks.
  c.model.d_model = 128  # Width of the residual stream.
  c.model.num_heads = 4  # Query heads.
  c.model.num_kv_heads = 2  # Key/value heads (grouped-query attention).
  c.model.head_dim = 32  # Width of one head.
  c.model.mlp_dim = 384  # Hidden width of the MLP.
  c.model.norm = 'rmsnorm'  # 'rmsnorm' (LLaMA) or 'layernorm' (GPT-2).
  c.model.position = 'rope'  # 'rope' (LLaMA) or 'learned' (GPT-2).
  c.model.mlp = 'swiglu'  # 'swiglu' (LLaMA) or 'gelu' (GPT-2).
  c.model.rope_theta = 10_000.0  # Base of the rotary frequencies.
  c.model.norm_eps = 1e-6  # Epsilon inside the norms.
  c.model.tie_embeddings = False  # Share the input embedding with the output.
  c.model.use_bias = False  # Biases in dense layers (GPT-2 uses them).
  c.model.dtype = 'float32'  # Compute dtype ('float32' or 'bfloat16'); params stay float32.
  c.model.init_std = 0.02  # Std of the normal init of kernels and embeddings.
  # What each block keeps for the backward pass: 'none' (all activations:
  # fastest), 'full' (only its input; recompute the rest: least memory) or
  # 'dots' (matmul outputs). Big models on accelerators want 'full'.
  c.model.remat = 'none'
  # Biases on the query/key/value projections only (Qwen2) while use_bias is
  # off; set by `python -m llm_jax.convert import` for such checkpoints.
  c.model.qkv_bias = False
  # Linear RoPE scaling (HF rope_scaling type 'linear'): positions are divided
  # by this factor; 1.0 is plain RoPE.
  c.model.rope_scaling_factor = 1.0
  # BERT/RoBERTa (set by `python -m llm_jax.convert import`, or for an encoder
  # trained here; see docs/encoders.md). Where the block norms sit: 'pre'
  # (before each sublayer, then a final norm) or 'post' (after each residual
  # add, BERT: the embeddings are normed and there is no final norm).
  c.model.norm_position = 'pre'
  c.model.gelu = 'tanh'  # The GELU MLP's: 'tanh' (GPT-2's approximation) or 'exact' (BERT).
  c.model.type_vocab_size = 0  # Rows of a token-type table (BERT 2, RoBERTa 1; 0: none).
  # Learned positions read row position + this (RoBERTa's padding offset: 2).
  c.model.position_offset = 0
  # BERT's masked-LM head: dense + GELU + LayerNorm before the (tied) output,
  # which then has a bias.
  c.model.mlm_head = False
  # What the model outputs: 'lm' (token logits), or an encoder's task head:
  # 'classification' (labels of a text or pair, from the first token) or 'qa'
  # (an answer's start and end in the context). See the task section.
  c.model.head = 'lm'
  # Classes of a 'classification' head: set from task.labels (leave at 0).
  c.model.num_labels = 0

  # ---- Instruction tuning (data.source='sft'; see llm_jax/data/sft.py and
  # configs/sft.py): data.paths are JSONL files of {"prompt", "response"} or
  # {"messages": [{"role", "content"}, ...]} objects.
  c.sft = ml_collections.ConfigDict()
  # Each message is rendered with this template ({role}, {content}); the loss
  # covers only the assistant's content (and what follows it in the template)
  # plus the end-of-text token after the last one.
  c.sft.template = '<|{role}|>\n{content}\n'
  # Pack several examples into one row (segment ids keep them apart); False
  # puts one example per row, padded.
  c.sft.pack = True

  # ---- Encoder tasks (model.head 'classification' or 'qa'; docs/encoders.md):
  # labelled examples instead of data.source. The tokenizer is tokenizer.path,
  # init_from's, or one trained on the task's texts; a row is data.seq_len
  # tokens.
  c.task = ml_collections.ConfigDict()
  # Training examples: JSONL (classification: one object per line) or SQuAD
  # v1.1/v2.0 JSON (qa, the official format).
  c.task.train_path = ''
  # Validation examples in the same format; '': data.val_fraction of the
  # training examples (by content hash).
  c.task.val_path = ''
  c.task.text_field = 'text'  # Classification: the JSONL field of the text.
  c.task.text_pair_field = ''  # Classification: the second text of a pair ('': none).
  c.task.label_field = 'label'  # Classification: the JSONL field of the label.
  # Classification: the label set in id order, comma-separated; '': the sorted
  # labels of the training file. A label outside it stops the run.
  c.task.labels = ''
  c.task.doc_stride = 128  # QA: tokens between the starts of a long context's windows.
  c.task.max_query_len = 64  # QA: question tokens kept (longer ones are cut).
  c.task.max_answer_len = 30  # QA: the longest answer (tokens) the span search returns.
  # QA (SQuAD v2): answer "no answer" when its score beats the best span's by
  # more than this (the official evaluation's null-score threshold).
  c.task.null_threshold = 0.0

  # ---- Preference objectives (data.source='preference': JSONL lines of
  # {"prompt", "chosen", "rejected"}, see llm_jax/data/preference.py).
  c.dpo = ml_collections.ConfigDict()
  c.dpo.beta = 0.1  # Strength of the pull to the reference (DPO's beta).
  # 'sigmoid' (DPO) or 'ipo' (squared loss on per-token log-ratios).
  c.dpo.loss = 'sigmoid'
  # Share of pairs assumed mislabelled (conservative DPO), in [0, 0.5).
  c.dpo.label_smoothing = 0.0
  c.orpo = ml_collections.ConfigDict()
  c.orpo.beta = 0.1  # Weight of ORPO's odds-ratio term beside the NLL.

  # ---- GRPO (objective='grpo', data.source='prompts': JSONL lines of
  # {"prompt", ...}; see llm_jax/inference/rollouts.py).
  c.rl = ml_collections.ConfigDict()
  # The reward of a completion: 'module:function' (or 'path/file.py:function'),
  # called as function(prompt, completion, row) -> float, where row is the
  # prompt's whole JSONL line. Or set rl.reward_model instead.
  c.rl.reward = ''
  # A reward-model run (objective='reward', same tokenizer as the policy)
  # whose score of prompt + completion is the reward. '': use rl.reward.
  c.rl.reward_model = ''
  # Completions sampled per prompt (the group whose rewards are normalised);
  # train.batch_size counts completions and must be a multiple of it.
  c.rl.num_generations = 8
  c.rl.max_new_tokens = 32  # Longest completion; prompts get the rest of seq_len.
  c.rl.temperature = 1.0  # Sampling temperature of the rollouts (> 0).
  c.rl.epsilon = 0.2  # Clip range of the importance ratio.
  # Weight of the k3 KL penalty to the reference (the starting weights, or
  # with LoRA the base); 0 holds no reference at all.
  c.rl.beta = 0.04
  # Held-out prompts scored (greedy completions) at each eval; 0: all of them.
  c.rl.eval_prompts = 64

  # ---- LoRA: low-rank adapters on chosen kernels, the base frozen.
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0  # Adapter rank; 0 turns LoRA off (full fine-tuning).
  c.lora.alpha = 16.0  # The update is scaled by alpha / rank.
  # Comma-separated patterns (fnmatch) of the dense layers that get adapters,
  # matched against paths such as 'blocks/0/attn/q' (a pattern also matches
  # any path it ends: 'attn/q' covers every layer's query projection).
  c.lora.targets = 'attn/q,attn/k,attn/v,attn/o'
  # Run the blocks as one lax.scan over stacked parameters (params then live
  # under blocks/<name> with a leading 'layers' axis): compile time no longer
  # grows with depth. The big presets turn it on; small models step faster
  # unrolled.
  c.model.scan_layers = False
  # Attention kernel: 'xla' (plain einsums, any device), 'cudnn' (flash
  # attention through jax.nn.dot_product_attention, NVIDIA GPUs), 'splash'
  # (Pallas splash attention, TPUs) or 'auto' (the best the platform has).
  c.model.attention = 'xla'
  # Dense matmuls (projections, MLP, LM head) on CPU: 'xla' (XLA's own dot),
  # 'mkl' (a custom call into oneMKL: AMX for bf16; llm_jax/model/cpu_matmul.py,
  # built on first use, XLA's dot if it cannot be) or 'auto' (mkl on a CPU
  # host for products of 64 rows or more, where it measured 1.2-1.6x faster
  # per step in bfloat16 and about 1.05x in float32). With 'auto' or 'mkl',
  # model.attention='xla' also runs fused on CPU hosts
  # (llm_jax/model/cpu_attention.py: 3.5x XLA's attention, forward and
  # backward, in both dtypes) and AdamW runs as one call per parameter
  # (llm_jax/training/fused_adamw.py). GPUs and TPUs always use XLA's dot.
  c.model.cpu_matmul = 'auto'

  # ---- Pruning (python -m llm_jax.prune; docs/compression.md).
  c.prune = ml_collections.ConfigDict()
  # Recovery fine-tuning of a pruned run: block kernel weights that are
  # exactly zero at the start (init_from a pruned run) get no gradient and no
  # update, so they stay exactly zero. The keep masks live in the optimizer
  # state: checkpoints carry them and a resume needs nothing else. A pruned
  # run's config.json sets it, and configs/continued.py copies it from there.
  c.prune.keep_zeros = False

  # ---- Optimizer: AdamW, linear warmup then cosine decay.
  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 5e-3  # Peak learning rate.
  c.optim.warmup_steps = 50  # Linear warmup from 0 to the peak.
  c.optim.min_lr_ratio = 0.1  # Cosine decays to peak * this at the last step.
  c.optim.b1 = 0.9  # Adam beta1.
  c.optim.b2 = 0.95  # Adam beta2.
  c.optim.eps = 1e-8  # Adam epsilon.
  c.optim.weight_decay = 0.1  # Decoupled decay on matrices (not norms/biases).
  c.optim.clip_norm = 1.0  # Global-norm gradient clipping (0: off).
  c.optim.grad_accum_steps = 1  # Micro-batches summed per optimizer update.
  # dtype of the Adam moments: 'float32', or 'bfloat16' to halve their memory
  # (the update itself is computed in float32).
  c.optim.state_dtype = 'float32'

  # ---- Training loop.
  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000  # Optimizer updates in the whole run.
  c.train.batch_size = 16  # Global batch in sequences (all hosts together).
  c.train.log_every = 10  # Steps between progress lines and TensorBoard.
  c.train.eval_every = 250  # Steps between validation passes (0: end only).
  c.train.eval_batches = 16  # Batches per validation pass.
  # A JSONL of {"prompt","reference"} / {"prompt","answer"} lines scored at
  # every eval (BLEU, ROUGE, exact match; see llm_jax/evaluation/tasks.py). '': none.
  c.train.eval_tasks = ''
  c.train.eval_task_tokens = 32  # New tokens generated per eval task.
  # A peak FLOP/s per device for MFU; 0 means a known table value for TPUs
  # and GPUs, and a matmul measured at start-up on CPU.
  c.train.peak_flops = 0.0
  c.train.num_samples = 3  # Samples printed at the end of the run.
  c.train.sample_tokens = 64  # New tokens per sample.
  c.train.sample_temperature = 0.8  # Temperature of the sampled continuation.
  # '|'-separated; a '|' inside '<|' or '|>' (chat markers such as <|user|>)
  # belongs to its prompt.
  c.train.sample_prompts = 'import os\n|def main(|class '
  # A non-finite loss or gradient never reaches the weights. 'halt': stop at
  # once, naming the step (the last checkpoint is kept); 'skip': drop that
  # update, count it, and halt after train.max_nan_skips in a row.
  c.train.nan_policy = 'halt'
  c.train.max_nan_skips = 3  # Consecutive skipped updates before halting.
  # Stop after this step with a checkpoint, as if preempted; a rerun resumes
  # (for queues with time limits). 0: run to train.steps.
  c.train.stop_at = 0
  c.train.compile_cache = True  # Reuse compiled steps from <workdir>/xla_cache.
  # A run directory whose tb/ shows earlier training but whose checkpoints/
  # holds none (deleted, moved, or that run stopped before its first save)
  # is refused, so lost checkpoints never silently restart a run at step 0.
  # True: train from step 0 there anyway (the old tb/ is moved aside, kept).
  c.train.allow_fresh_start = False
  # Cross-entropy over chunks of this many positions (0: all at once). Each
  # chunk's logits are recomputed in the backward pass, so the full float32
  # [batch, seq, vocab] logits never exist: large vocabularies fit.
  c.train.loss_chunk = 0

  # ---- Devices: a mesh of (data, fsdp, tensor); one -1 fills the devices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Data parallel: replicas see different examples.
  c.mesh.fsdp = 1  # Fully sharded: params/optimizer state split, batch too.
  c.mesh.tensor = 1  # Tensor parallel: heads, MLP and vocab split.
  # Logical axis name -> mesh axis (or None: replicated). Parameters name
  # their axes (see llm_jax/model/transformer.py); these rules place them on the mesh.
  c.mesh.rules = (
      ('batch', ('data', 'fsdp')),
      ('vocab', 'tensor'),
      ('embed', 'fsdp'),
      ('mlp', 'tensor'),
      ('heads', 'tensor'),
      ('kv_heads', 'tensor'),
      ('head_dim', None),
      ('norm', None),
      ('layers', None),  # The stacked axis of scanned blocks.
  )

  # ---- Checkpoints (Orbax) under <workdir>/checkpoints.
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 250  # Steps between saves; the last step always saves.
  c.checkpoint.keep = 2  # Keep this many most recent checkpoints.
  c.checkpoint.keep_every = 0  # Also keep every N-th step's forever (0: off).
  return c
