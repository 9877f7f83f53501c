// What the seed's app does with its voice slice, outside React: the store of its Step 3, the three
// RTK Query endpoints, then a socket.io voice session through useWebRTCVoice(). Every result (and
// every error) lands in window.__results for tests/test_seed_000.py; `done` is set last.
//
// Query parameters: userId, chatId, httpTranscript, socketTranscript, modelName (optional), and
// probe=1 for a page on an origin the server does not allow (it only records what was refused).
import { configureStore } from '@reduxjs/toolkit';
import { useWebRTCVoice, voiceApi } from './src/redux/features/voice/voiceApi';

type Results = Record<string, unknown> & { done?: boolean; steps: string[] };

declare global {
  interface Window {
    __results?: Results;
  }
  // esbuild's --define puts the API's URL here at bundle time, as the app's bundler would.
  const process: { env: Record<string, string | undefined> };
}

const params = new URLSearchParams(window.location.search);
const userId = params.get('userId') ?? 'seed-user';
const chatId = params.get('chatId') ?? 'chat-42';
const httpTranscript = params.get('httpTranscript') ?? 'What is the capital of France?';
const socketTranscript = params.get('socketTranscript') ?? 'And of Italy?';
const modelName = params.get('modelName') ?? undefined;
const probe = params.get('probe') === '1';
// Under the test's own wait (120 s): a stuck step is then reported as that step's error, with the
// results of the steps before it, instead of as a page that never finished.
const STEP_TIMEOUT_MS = 60_000;

const results: Results = {
  steps: [],
  origin: window.location.origin,
  apiUrl: process.env.VITE_API_URL,
};

const store = configureStore({
  reducer: {
    [voiceApi.reducerPath]: voiceApi.reducer,
  },
  middleware: (getDefaultMiddleware) => getDefaultMiddleware().concat(voiceApi.middleware),
});

// Only plain fields: socket.io's errors carry the XHR that failed, which cannot leave the page.
function describe(error: unknown): unknown {
  if (!(error instanceof Error)) return error;
  const fields: Record<string, unknown> = { name: error.name, message: error.message };
  for (const [key, value] of Object.entries(error)) {
    if (value === null || ['string', 'number', 'boolean'].includes(typeof value)) fields[key] = value;
    else if (key === 'data') fields[key] = JSON.parse(JSON.stringify(value));
  }
  return fields;
}

function within<T>(promise: Promise<T>, what: string): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${what}: no answer in ${STEP_TIMEOUT_MS} ms`)), STEP_TIMEOUT_MS);
    promise.then(
      (value) => {
        clearTimeout(timer);
        resolve(value);
      },
      (error) => {
        clearTimeout(timer);
        reject(error);
      },
    );
  });
}

async function step(name: string, run: () => Promise<unknown>): Promise<void> {
  results.steps.push(name);
  try {
    results[name] = await run();
  } catch (error) {
    results[`${name}Error`] = describe(error);
  }
}

// A query's or mutation's settled result, as a component would see it: {data} or {error}.
async function settle<R extends { data?: unknown; error?: unknown }>(request: PromiseLike<R>): Promise<unknown> {
  const result = await request;
  return { data: result.data, error: result.error };
}

async function run(): Promise<void> {
  await step('status', () => settle(store.dispatch(voiceApi.endpoints.getVoiceStatus.initiate())));
  await step('voices', () => settle(store.dispatch(voiceApi.endpoints.getAvailableVoices.initiate())));
  await step('processed', () =>
    settle(
      store.dispatch(
        voiceApi.endpoints.processVoiceTranscript.initiate({ transcript: httpTranscript, chatId, userId, modelName }),
      ),
    ),
  );

  const { startVoiceSession, sendVoiceTranscript, endVoiceSession } = useWebRTCVoice();
  const transcripts: string[] = [];
  const responses: { messageId: string; text: string }[] = [];
  results.transcripts = transcripts;
  results.responses = responses;
  let responded: (value: unknown) => void = () => undefined;
  const firstResponse = new Promise((resolve) => {
    responded = resolve;
  });

  await step('session', async () => {
    const session = await within(
      startVoiceSession(
        userId,
        chatId,
        (transcript) => transcripts.push(transcript),
        (response) => {
          responses.push(response);
          responded(response);
        },
      ),
      'start-voice-session',
    );
    // socket.io-client's typings keep nsp private; it says which namespace the URL chose.
    results.namespace = (session.socket as unknown as { nsp?: string } | null)?.nsp;
    if (probe) {
      endVoiceSession(session);
      return { sessionId: session.sessionId };
    }
    sendVoiceTranscript(session, socketTranscript);
    await within(firstResponse, 'voice-response');
    endVoiceSession(session);
    return { sessionId: session.sessionId };
  });
}

run()
  .catch((error) => {
    results.harnessError = describe(error);
  })
  .finally(() => {
    results.done = true;
    window.__results = results;
  });
