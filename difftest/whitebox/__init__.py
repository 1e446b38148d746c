"""The white-box part of the differ: what the debug protocol lets it see inside two servers.

    safetensors.py   the protocol's bodies without torch (reader, writer, fp8 / fp4 / e8m0 codes)
    activations.py   point names, POST /debug/activations, per-point comparison, LayerThresholds
    replay.py        POST /debug/module: local vs inherited error, batch slots, module ranking
    layers.py        the per-layer diff of one (baseline, target) pair; the layers verdict
    audit.py         the quantization audit of one module (or all): layouts, hypotheses, backends
    localise.py      one target's white-box pass (diffs + one audit per blamed module) and the
                     localisation sentence

Dependencies point one way: safetensors <- activations <- replay <- layers <- localise, and
audit <- localise. docs/design.md "White-box localisation" describes the method.
"""
