// The capture AudioWorklet of the audio-chat socket (/api/v1/chat/audio), at the path pages load it from:
//
//   await audioContext.audioWorklet.addModule('/static/audio-processor.js');
//   const processor = new AudioWorkletNode(audioContext, 'audio-processor');
//   processor.port.onmessage = (event) => socket.send(event.data);
//
// Each message is an ArrayBuffer of 20 ms of the microphone as PCM16 little-endian mono at 16 kHz,
// whatever the AudioContext's rate: what the server's speech recognition takes, sent as it is.
import { PcmDownsampler } from "./rtcvoice.js";

const OUTPUT_RATE = 16000;
const FRAME_SAMPLES = 320;
const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

class AudioProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.resampler = new PcmDownsampler(sampleRate, OUTPUT_RATE, FRAME_SAMPLES, (frame) => {
      if (!LITTLE_ENDIAN) {
        const view = new DataView(frame.buffer);
        for (let i = 0; i < frame.length; i++) view.setInt16(2 * i, frame[i], true);
      }
      this.port.postMessage(frame.buffer, [frame.buffer]);
    });
  }

  process(inputs) {
    const channels = inputs[0];
    if (channels && channels.length) this.resampler.push(channels[0]); // the first channel: mono speech
    return true;
  }
}

registerProcessor("audio-processor", AudioProcessor);
