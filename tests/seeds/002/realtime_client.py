import asyncio
import websockets
import json

async def connect_realtime():
    uri = "ws://localhost:8000/api/v1/streaming/realtime/test_user"
    
    async with websockets.connect(uri) as websocket:
        # Send session update
        await websocket.send(json.dumps({
            "type": "session.update",
            "session_update": {
                "voice": "alloy",
                "language": "en"
            }
        }))
        
        # Send text input
        await websocket.send(json.dumps({
            "type": "conversation.item.input",
            "conversation_item_input": {
                "type": "input_text",
                "text": "Hello, how are you?"
            }
        }))
        
        # Listen for responses
        async for message in websocket:
            data = json.loads(message)
            print(f"Received: {data}")

asyncio.run(connect_realtime())
