# Environment of a jax_sft GPU run (sourced by launch/sft.sbatch; `source launch/env.sh` for a
# single-host run too). Every value can be overridden by exporting it before sourcing; see
# launch/README.md for what each one does. Only flags that exist in current XLA are set
# (tests/test_distributed.py checks that jaxlib accepts every one of them).

# --- Hugging Face caches: on a filesystem every node sees -----------------------------------
export HF_HOME="${HF_HOME:-$HOME/.cache/huggingface}"
export HF_DATASETS_CACHE="${HF_DATASETS_CACHE:-$HF_HOME/datasets}"
# Set HF_HUB_OFFLINE=1 after downloading the model and dataset once on a login node, so that
# the N processes of a job read the cache instead of all querying the hub at start-up.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-0}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
# WANDB_API_KEY is read from the submitting shell (sbatch exports it); only needed with
# logger.wandb_enabled=true.

# --- XLA ---------------------------------------------------------------------------------
# JAX_SFT_XLA_FLAGS holds the tuned flags; set it to "" to drop them. Your own XLA_FLAGS come
# after them, and the last occurrence of a flag wins.
JAX_SFT_XLA_FLAGS="${JAX_SFT_XLA_FLAGS-\
--xla_gpu_enable_latency_hiding_scheduler=true \
--xla_gpu_enable_pipelined_all_gather=true \
--xla_gpu_enable_pipelined_reduce_scatter=true \
--xla_gpu_enable_pipelined_all_reduce=true \
--xla_gpu_enable_while_loop_double_buffering=true \
--xla_gpu_all_gather_combine_threshold_bytes=134217728 \
--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728 \
--xla_gpu_all_reduce_combine_threshold_bytes=134217728}"
XLA_FLAGS="${JAX_SFT_XLA_FLAGS}${XLA_FLAGS:+ $XLA_FLAGS}"
export XLA_FLAGS="${XLA_FLAGS# }"
# Optional, append to XLA_FLAGS when it helps (see launch/README.md):
#   --xla_gpu_enable_command_buffer=     (empty: no CUDA graphs) when profiling kernel by kernel,
#                                        or when CUDA graphs cost memory / misbehave with NCCL.
# Fraction of GPU memory JAX reserves up front (JAX's default is 0.75).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"

# --- NCCL --------------------------------------------------------------------------------
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"   # INFO to see the transports NCCL picked (IB, NVLink)
# Site-specific; set them if NCCL picks the wrong network (ask your admins for the names):
#   export NCCL_SOCKET_IFNAME=...        # e.g. the interface of the cluster network
#   export NCCL_IB_HCA=...               # e.g. mlx5 devices used for InfiniBand / RoCE
