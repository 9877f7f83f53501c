"""A real MCP server over stdio for tests/test_tools.py (``python tests/mcp_tool_server.py``)."""

from __future__ import annotations

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
    server.run()
