export { useVoiceCall, type UseVoiceCall, type UseVoiceCallOptions, type VoiceCallState } from "./useVoiceCall.js";
export { VoiceCallModal, statusLabel, type VoiceCallModalProps } from "./VoiceCallModal.js";
export { voiceSlice, voiceEvent, voiceCallEnded, type VoiceState } from "./voiceSlice.js";
