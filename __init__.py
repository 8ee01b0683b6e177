"""ComfyUI-Distributed: one workflow rendered on every GPU and gathered on the master.

ComfyUI imports this folder as a package; everything inside uses relative imports.
"""
import logging

from . import nodes
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

try:
    from server import PromptServer
except ImportError:  # imported outside ComfyUI (tools, tests): nodes only
    PromptServer = None

if PromptServer is not None and getattr(PromptServer, "instance", None) is not None:
    from . import distributed_routes

    try:  # one runtime object, built by setup, for the routes and the nodes alike
        nodes.attach(distributed_routes.setup(PromptServer.instance))
    except Exception:  # never take ComfyUI down with us
        logging.getLogger("comfyui-distributed").exception(
            "[Distributed] could not start; the nodes load but will not distribute")

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
