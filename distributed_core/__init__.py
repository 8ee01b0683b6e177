"""The logic of ComfyUI-Distributed, free of any ComfyUI import so that it can be tested on plain values."""
