"""gemserve: the Gemini API on models that run on this machine."""

from gemserve.engine.backends import q5_0 as _q5_0

# Before anything imports llama_cpp: llama.cpp's CPU backend binds the functions it calls as it loads, and must
# find gemserve's Q5_0 kernel among them (engine/backends/q5_0.py).
_q5_0.load()
