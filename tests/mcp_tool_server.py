"""A real MCP server for tests/test_tools.py: over stdio (``python tests/mcp_tool_server.py``), or
streamable HTTP at http://127.0.0.1:PORT/mcp (``python tests/mcp_tool_server.py --http PORT``)."""

from __future__ import annotations

import sys

try:  # mcp 2
    from mcp.server.mcpserver import MCPServer as Server
    from mcp.server.mcpserver.exceptions import ToolError
except ImportError:  # mcp 1
    from mcp.server.fastmcp import FastMCP as Server
    from mcp.server.fastmcp.exceptions import ToolError

server = Server("rtcvoice-test-tools")


@server.tool()
def find_order(order_id: str) -> str:
    """Find an order by its id."""
    if order_id == "missing":
        raise ToolError("no order missing")
    return f"Order {order_id} ships on Tuesday."


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--http":
        port = int(sys.argv[2])
        try:  # mcp 2
            server.run("streamable-http", host="127.0.0.1", port=port)
        except TypeError:  # mcp 1: the address is a setting
            server.settings.host, server.settings.port = "127.0.0.1", port
            server.run("streamable-http")
    else:
        server.run()
