"""Every loomax config key, with its default and what it means.

Experiment files (`configs/*.py`) start from `get_config()` here and override keys.
Command-line overrides: `python train.py --config configs/tiny.py --config.model.num_layers=4`.
The config is locked, so a misspelt key is an error naming the key.

Every numeric key has a valid range, given in its comment as [>= 1], [> 0], [0, 1) and so on;
training/safety/config_checks.py refuses a value outside it (one line, exit status 2) before anything
is compiled or written.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()

  # --- run ---
  c.steps = 1000                     # optimizer steps to train [>= 1]
  c.batch_size = 16                  # global batch, packed sequences [>= 1, a multiple of data x fsdp]
  c.seq_len = 512                    # tokens per packed sequence [>= 1]
  c.seed = 0                         # seeds params, data order and dropout-like RNG
  c.log_every = 20                   # metrics row every N steps [>= 1]
  c.eval_every = 200                 # held-out eval every N steps [>= -1] (0 = at the end, -1 = off)
  c.eval_batches = 8                 # batches per held-out eval (0 = eval off) [>= 0]
  # Long-context evals run at every eval (training/evaluation/evals.py); the loop's eval/loss always runs.
  c.eval = ml_collections.ConfigDict()
  c.eval.tasks = 'loss'              # comma-separated: loss, position_loss, passkey, mqar, ruler
  c.eval.lengths = ''                # comma-separated context lengths; '' = seq_len
  c.eval.tokens = 16384              # position_loss: held-out tokens per length
  c.eval.passkey_samples = 4         # passkey: examples per (length, needle depth)
  c.eval.mqar_pairs = '4,16,64'      # mqar: key-value pair counts (those that fit the length)
  c.eval.mqar_samples = 8            # mqar: examples per (length, pairs)
  c.eval.ruler_tasks = 'all'         # ruler (training/evaluation/ruler.py): comma-separated task names or all
  c.eval.ruler_samples = 4           # ruler: examples per (task, length); NIAH: per depth too
  # 'auto' = continue from the newest intact checkpoint in workdir (fresh if it has none),
  # 'none' (or '') = fresh start (refuses a workdir that already holds checkpoints), or a
  # checkpoints directory to continue from (into an empty workdir).
  c.resume = 'auto'
  c.resume_step = -1                 # [>= -1] resume exactly this step (no fallback); -1 = newest
  c.init_from = ''                   # checkpoint dir: load its parameters only, fresh optimizer
                                     # (used only when the workdir holds no checkpoint yet)
  c.profile_steps = 0                # [>= 0] >0: a jax.profiler trace of N steps into workdir/tb
  c.profile_start = 5                # first profiled step [>= 0]
  c.progress = True                  # progress bar on process 0 (else, or off a terminal: log lines)
  c.dry_run = False                  # print config, mesh, params, compiled step memory; no training

  # --- model ---
  m = c.model = ml_collections.ConfigDict()
  m.name = 'transformer'             # registry key: see modeling/registry.py
  # num_layers, d_model, num_heads, num_kv_heads, head_dim, mlp_dim, vocab_size: [>= 1]
  m.num_layers = 4
  m.d_model = 256
  m.num_heads = 4                    # query heads
  m.num_kv_heads = 2                 # key/value heads (GQA); must divide num_heads
  m.head_dim = 64
  m.mlp_dim = 768                    # SwiGLU hidden width
  m.vocab_size = 256                 # byte-level default
  m.rope_theta = 10_000.0            # 0 disables rotary embeddings (NoPE) [>= 0]
  # RoPE scaling for context extension (modeling/rope.py; HF transformers' formulas).
  m.rope_scaling = ml_collections.ConfigDict()
  m.rope_scaling.type = 'none'       # none | linear | ntk | yarn | llama3 | longrope
  m.rope_scaling.factor = 1.0        # context growth ratio s (new length / original length)
  m.rope_scaling.original_max_position_embeddings = 0  # L0: trained length (yarn/llama3/longrope)
  m.rope_scaling.low_freq_factor = 1.0   # llama3: wavelengths above L0/low are divided by factor
  m.rope_scaling.high_freq_factor = 4.0  # llama3: wavelengths below L0/high are kept
  m.rope_scaling.beta_fast = 32.0    # yarn: rotations per L0 above which a frequency extrapolates
  m.rope_scaling.beta_slow = 1.0     # yarn: rotations per L0 below which it interpolates
  m.rope_scaling.truncate = True     # yarn: round the correction range to whole dimensions
  m.rope_scaling.attention_factor = 0.0  # yarn/longrope cos/sin multiplier; 0 = paper default
  m.rope_scaling.long_factor = ''    # longrope: head_dim/2 comma-separated rescale factors
  m.tie_embeddings = True            # share the token embedding with the output head
  m.norm_eps = 1e-6                  # [> 0]
  m.init_std = 0.02                  # std of embeddings and projections [> 0]
  # Defaults measured on the tiny config, 2 CPU cores, process CPU time per step
  # (docs/performance.md): the Python loop beats the scan (~9% less CPU time, ~20% less compiled
  # memory at 4 layers); use scan_layers=True for deep models, where it bounds compile time.
  m.scan_layers = False              # one scanned layer stack instead of a Python loop
  # 'none' because recomputation is pure cost when activations fit: 'full' took ~25% more CPU
  # time per step, 'dots' the same as 'none' within noise (7% less compiled memory).
  m.remat = 'none'                   # none | full | dots | dots_no_batch | save_attention_out
  m.dtype = 'float32'                # activation/compute dtype
  m.param_dtype = 'float32'
  m.sliding_window = 0               # >0: every attention layer sees only the last N tokens [>= 0]
  # Stochastic cross-layer KV routing (modeling/kv_routing.py); p=1 is off.
  m.kv_routing = ml_collections.ConfigDict()
  m.kv_routing.p = 1.0               # probability a layer keeps its own K/V in training (0, 1]
  m.kv_routing.stop_gradient = False # borrowed K/V carry no gradient into their source layer
  m.kv_routing.cache_every = 1       # inference plan: every g-th layer keeps a KV cache
  m.kv_routing.cache_layers = ''     # or an explicit cache set, e.g. '0,2,3' (beats cache_every)
  # CART looped core (modeling/cart.py); read only when model.name='cart'.
  m.cart = ml_collections.ConfigDict()
  m.cart.prelude_layers = 6          # P: distinct causal self-attention layers before the loop
  m.cart.coda_layers = 1             # distinct self-attention layers after the loop
  m.cart.loops = 6                   # R: core applications in training (model called with rng)
  m.cart.eval_loops = 0              # R when the model is called with rng=None (eval); 0 = loops
  m.cart.max_loops = 16              # rows of the sinusoidal loop-index table: the largest R
  m.cart.loop_embed_dim = 32         # width of the sinusoidal loop-index code
  m.cart.kv_latent_dim = 0           # low-rank K/V latent width (anchor and MLA); 0 = d_model // 4
  m.cart.prelude_attention = 'mla'   # prelude self-attention: mla (the paper's) | gqa
  m.cart.coda_attention = 'mla'      # coda self-attention: mla (the paper's) | gqa
  m.cart.mla_rope_dim = 0            # MLA decoupled RoPE width per head, of head_dim; 0 = head_dim // 2
  m.cart.hyper_connections = True    # softmax blend of the last hyper_slots states; False = newest
  m.cart.hyper_slots = 3
  m.cart.lti_gate = True             # h = sigmoid(a) * hh + block(hh); False: h = block(hh)
  m.cart.lti_init = 0.9              # initial sigmoid(a) (the spectral radius rho at init)
  m.cart.loop_embedding = True       # add W_lie @ pe[r] to the state before core application r
  m.cart.recompute_kv = False        # ablation: K/V projected from the current state every loop
  m.cart.shared_core = True          # False (ablation): R distinct core blocks, no weight tying
  m.cart.remat_loop = 'none'         # remat policy per core application (names as model.remat)
  # SambaY (modeling/sambay.py, ssm.py): Mamba/SWA self-decoder, GMU/cross-attention cross-decoder.
  m.sambay = ml_collections.ConfigDict()
  m.sambay.window = 128              # sliding-window attention span (tokens) in the self-decoder
  m.sambay.nope = True               # no rotary embeddings in any attention layer (Mamba gives order)
  m.sambay.d_state = 16              # Mamba state size N per channel
  m.sambay.d_conv = 4                # Mamba depthwise causal conv width
  m.sambay.expand = 2                # Mamba inner width = expand * d_model (= the GMU memory width)
  m.sambay.dt_rank = 0               # rank of the dt projection; 0 = ceil(d_model / 16)
  m.sambay.scan_impl = 'chunked'     # chunked | associative | sequential (the reference)
  m.sambay.scan_chunk = 64           # chunked: tokens per chunk (parallel inside, sequential across)

  # --- attention kernel on one device (the seam in modeling/attention.py) ---
  a = c.attention = ml_collections.ConfigDict()
  # auto | xla | jax_nn | blockwise | pallas | splash (modeling/kernels/). auto: the fused
  # Pallas kernel on GPU; Splash on one TPU (context_impl none); otherwise xla while one
  # layer's float32 scores fit 1 GiB per device, else blockwise (logged). jax_nn: cuDNN on
  # GPU for one device (causal, windows), else XLA. splash: TPU only.
  # Context-parallel rings run the matching per-block kernel (pallas | blockwise | xla).
  a.impl = 'auto'
  a.block_q = 512                    # blockwise / pallas: query block [>= 1]
  a.block_kv = 512                   # blockwise / pallas: key/value block [>= 1]
  a.block_q_bwd = 0                  # backward query tile; 0: blockwise as forward, pallas 32
  a.block_kv_bwd = 0                 # backward key/value tile; 0: blockwise as forward, pallas 32
  a.strict = False                   # True: a kernel fallback (other kernel / dense memory) errors
  a.rows_packed = True               # False promises one document per row: cuDNN needs no mask
  # >0: LM head + loss over sequence chunks of N tokens; 0: whole sequence at once;
  # -1 (auto): chunks once the float32 [tokens, vocab] logits pass 1 GiB (training/loss.py)
  a.loss_chunk = -1                  # [>= -1]

  # --- data (training/data/) ---
  d = c.data = ml_collections.ConfigDict()
  # local_text | text | jsonl | array_record | synthetic | passkey | mqar
  d.source = 'local_text'
  d.paths = ''                       # comma-separated globs; '' with local_text = stdlib *.py
  d.text_field = 'text'              # jsonl: field holding the document
  # bytes | sentencepiece:PATH | hf:PATH (tokenizer.json); see training/data/tokenizer.py
  d.tokenizer = 'bytes'
  d.decode_errors = 'strict'         # text that is not UTF-8: strict (error naming the file) | replace
  d.eval_fraction = 0.02             # share of documents held out for eval (by stable hash) [0, 1)
  d.eval_paths = ''                  # globs of a separate eval corpus: then all of paths trains
  # Weighted mixture (training/data/mixture.py): ((dict of data.* keys, weight), ...); () = off.
  d.mixture = ()
  d.num_packing_bins = 16            # first-fit packing bins kept open [>= 1]
  d.shuffle = True                   # seeded per-epoch shuffle of documents
  d.shuffle_window = 1024            # [>= 0] also shuffle document pieces within this window (0 = off)
  d.read_threads = 2                 # file reader threads [>= 0]
  d.read_prefetch = 32               # documents read ahead [>= 0]
  d.worker_count = 0                 # grain worker processes (0 = in-process) [>= 0]
  d.task_length = 0                  # passkey/mqar: tokens per example (0 = seq_len) [0, seq_len]
  d.mqar_num_pairs = 16              # mqar: key-value pairs per example
  # Length curriculum (training/data/curriculum.py): 'start:seq_len[:batch_size],...', e.g.
  # '0:128,200:256,400:512'; batch_size defaults to constant tokens per step. '' = seq_len always.
  d.length_schedule = ''

  # --- optimizer (training/optimizer.py) ---
  o = c.optimizer = ml_collections.ConfigDict()
  o.lr = 3e-3                        # peak learning rate [>= 0]
  o.schedule = 'cosine'              # cosine | wsd | constant
  # The learning-rate curve depends on optimizer.* keys only, never on `steps` alone:
  o.warmup_steps = 100               # linear warm-up steps (not capped by `steps`) [>= 0]
  o.decay_steps = 0                  # [>= 0] schedule length (cosine/wsd end here); 0 = `steps` at the
                                     # run's first start, recorded in the checkpoint and kept
                                     # when a resume changes `steps`
  o.min_lr_ratio = 0.1               # final lr = min_lr_ratio * lr [0, 1]
  o.decay_fraction = 0.2             # wsd: share of decay_steps spent decaying at the end [0, 1]
  o.b1 = 0.9                         # [0, 1)
  o.b2 = 0.95                        # [0, 1)
  o.eps = 1e-8                       # [> 0]
  o.weight_decay = 0.1               # [>= 0]
  o.decay_norms_and_biases = False   # apply weight decay to norm scales and biases too
  o.clip_norm = 1.0                  # global gradient-norm clip (0 = off) [>= 0]
  o.grad_accum_steps = 1             # micro-batches per optimizer step (batch_size is per step) [>= 1]
  o.skip_nonfinite = False           # a non-finite loss/gradient skips the update (params and
                                     # optimizer state unchanged; counted as train/skipped_steps)
                                     # instead of stopping the run

  # --- device mesh (parallelism/mesh.py); sizes, -1 = all remaining devices ---
  mesh = c.mesh = ml_collections.ConfigDict()
  mesh.data = -1
  mesh.fsdp = 1
  mesh.context = 1
  mesh.tensor = 1
  # True: the planner (training/autoplan.py, docs/planning.md) picks mesh.*, context_impl,
  # attention.impl, model.remat and grad_accum_steps for the devices this run sees (logged)
  mesh.auto = False
  mesh.auto_memory_gib = 0.0         # auto: memory per device; 0 = the backend's (else profile's)
  mesh.auto_hardware = ''            # auto: profile (h100 | h200 | tpu-v5p | cpu | JSON); '' = by device

  # --- parallel strategies ---
  p = c.parallelism = ml_collections.ConfigDict()
  p.context_impl = 'none'            # none | allgather | ring | token_ring | auto | disaggregated
  p.zigzag = True                    # causal load balance for ring/token_ring (data layout)
  p.context_full_duplex = True       # auto: links carry both directions at once (NVLink/ICI)
  p.xla_flags = 'auto'               # auto (GPU overlap flags) | none | 'flags'; env XLA_FLAGS wins
  # Hybrid data parallelism (parallelism/hybrid_dp.py): data x context devices form one pool;
  # per batch, each document spans its own aligned group of devices (ring inside the group).
  p.hybrid_dp = ml_collections.ConfigDict()
  p.hybrid_dp.enabled = False        # plan whole documents per batch instead of a static mesh
  p.hybrid_dp.capacity = 4096        # tokens per device per micro-batch (even)
  p.hybrid_dp.layouts = (1, 2, 4, 8) # group sizes compiled (each divides the pool; 1 required)
  p.hybrid_dp.slack = 0.02           # short docs may go within slack x mean load of the least loaded
  # Longest document the pipeline feeds whole (tokens); longer ones are cut into pieces of this
  # length (logged). 0 = capacity x the largest layout, the longest the pool holds. With hybrid
  # DP, seq_len is only the held-out eval row length (must not exceed this).
  p.hybrid_dp.max_doc_len = 0
  # disaggregated (parallelism/disaggregation.py): attention tasks move over the batch axes;
  # needs mesh.context=1 and optimizer.grad_accum_steps=1.
  p.dca_tolerance = 0.02             # each device's executed attention work within this of mean
  p.dca_nano_batches = 2             # ping-pong nano-batches (rows) per device and step
  p.dca_q_capacity = 1.0             # query rows a device sends / receives, x its nano tokens
  p.dca_kv_capacity = 4.0            # key/value rows a device sends / receives, likewise
  p.dca_exchange = 'auto'            # ragged (GPU/TPU ragged_all_to_all) | permute | auto
  p.dca_ping_pong = 'layer'          # layer: DistCA's schedule over projections + MLP | attention
  # Logical axis -> mesh axes. Model code names only the logical axes on the left.
  p.rules = (
      ('batch', ('data', 'fsdp')),   # activations' batch dimension
      ('length', 'context'),         # activations' sequence dimension
      ('act_embed', None),           # activations' model dimension
      ('act_heads', 'tensor'),       # activations' head dimension
      ('act_mlp', 'tensor'),         # activations' MLP hidden dimension
      ('embed', 'fsdp'),             # parameters' model dimension
      ('heads', 'tensor'),           # parameters' query-head dimension
      ('kv_heads', 'tensor'),        # key/value heads; replicated where tensor does not divide them
      ('mlp', 'tensor'),             # parameters' MLP hidden dimension
      ('vocab', 'tensor'),
      ('layers', None),              # the stacked-layer dimension under scan
  )

  # --- multi-process (jax.distributed) ---
  dist = c.distributed = ml_collections.ConfigDict()
  # host:port | 'auto' (jax.distributed reads the cluster's environment) | '' = single process,
  # or auto when SLURM/Open MPI/Kubernetes/TPU pod is detected (docs/clusters.md). Env
  # LOOMAX_COORDINATOR / LOOMAX_NUM_PROCESSES / LOOMAX_PROCESS_ID set the same.
  dist.coordinator = ''
  dist.num_processes = 0             # 0 = unset (1, or from the cluster with auto)
  dist.process_id = -1               # -1 = unset (0, or from the cluster with auto)
  dist.coordinator_port = 0          # auto: coordinator port (0 = JAX's choice, see docs)
  dist.local_device_ids = 'all'      # all (one process per host) | auto (one per device) | 0,1
  dist.init_timeout_s = 120          # give up waiting for peers at start-up after this long [> 0]
  dist.heartbeat_timeout_s = 100     # [> 0] a silent peer is declared dead (the run stops) after this

  # --- checkpoints (checkpoint/) ---
  ck = c.checkpoint = ml_collections.ConfigDict()
  ck.every = 0                       # save every N steps (0 = only at the end) [>= 0]
  ck.keep = 3                        # keep the last K checkpoints [>= 1]
  ck.keep_every = 0                  # also keep every M-th step forever (0 = off) [>= 0]
  ck.async_save = True
  ck.verify = True                   # check every array's and data file's checksum on restore;
                                     # a corrupted step falls back to the previous intact one

  # --- performance accounting ---
  perf = c.perf = ml_collections.ConfigDict()
  perf.peak_flops = 0.0              # per-device FLOP/s for MFU; 0 = measure a matmul at start [>= 0]
  perf.peak_trials = 10              # matmul timings at start; MFU divides by the fastest [>= 1]
  return c
