"""The /debug/* protocol's names, shared by the shim (server_shim.debug) and the differ
(difftest.client, difftest.whitebox). Torch-free: the differ imports it without torch.

Bodies are safetensors; these are the routes, the tensor names and the `__metadata__` keys both
sides read and write. A key renamed here is renamed on both sides at once.
"""

from __future__ import annotations

# Routes
CONFIG = "/debug/config"
ACTIVATIONS = "/debug/activations"
MODULE = "/debug/module"
QUANT = "/debug/quant/"  # + module name

# POST /debug/module: request metadata and tensors, response tensor
META_MODULE = "module"  # which module to replay (also echoed in the response metadata)
META_BACKEND = "backend"  # optional: run the stored weights through another kernel backend
META_DTYPE = "dtype"  # the compute dtype (module and activations responses)
INPUT = "input"  # the module's input tensor; other tensors are extra keyword arguments
OUTPUT = "output"

# POST /debug/activations: response metadata (JSON-encoded lists) and tensor naming
META_TOKEN_IDS = "token_ids"
META_POINTS = "points"  # point names in execution order
META_POSITIONS = "positions"
META_DECODE_TOKEN_IDS = "decode_token_ids"
META_DECODE_STEPS = "decode_steps"
META_INPUTS = "inputs"  # with `inputs: true`: the names of the captured module inputs
INPUT_SUFFIX = ":input"  # "{point}:input" is what went into a point: the body /debug/module takes
DECODE_PREFIX = "decode."  # "decode.{step}.{point}": a decode step's tensors

# GET /debug/quant/{module}: metadata of the stored weight's layout
META_SCHEME = "scheme"
META_SCALE_ORDER = "scale_order"
META_SCALE_SHUFFLED = "scale_shuffled"
