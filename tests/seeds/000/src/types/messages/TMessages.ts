// Stand-in for the app's own module, which the seed imports but does not show: voiceApi.ts
// only names TMessage as a type (never as a value), so any message type satisfies it.
export type TMessage = {
  _id?: string;
  role: 'user' | 'assistant';
  content: string;
};
