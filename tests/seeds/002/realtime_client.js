const ws = new WebSocket('ws://localhost:8000/api/v1/streaming/realtime/test_user');

ws.onopen = () => {
  // Send session update
  ws.send(JSON.stringify({
    type: 'session.update',
    session_update: {
      voice: 'alloy',
      language: 'en'
    }
  }));
};

ws.onmessage = (event) => {
  const message = JSON.parse(event.data);
  console.log('Received:', message);
};

// Send text input
ws.send(JSON.stringify({
  type: 'conversation.item.input',
  conversation_item_input: {
    type: 'input_text',
    text: 'Hello, how are you?'
  }
}));
