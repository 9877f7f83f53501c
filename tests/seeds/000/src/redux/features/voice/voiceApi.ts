import { createApi, fetchBaseQuery } from '@reduxjs/toolkit/query/react';
import { TMessage } from '@/types/messages/TMessages';
import { Socket, io } from 'socket.io-client';

// Define voice-related types
interface VoiceStatus {
  webrtc: boolean;
  speechRecognition: boolean;
  speechSynthesis: boolean;
}

interface VoiceInfo {
  id: string;
  name: string;
  gender: string;
  lang: string;
}

interface VoiceSession {
  sessionId: string;
  socket: Socket | null;
  active: boolean;
  transcript: string;
  response: string;
}

// Create the voice API slice
export const voiceApi = createApi({
  reducerPath: 'voiceApi',
  baseQuery: fetchBaseQuery({
    baseUrl: process.env.VITE_API_URL || 'http://localhost:5000/api/v1/',
  }),
  tagTypes: ['Voice'],
  endpoints: (builder) => ({
    // Get voice service status
    getVoiceStatus: builder.query<VoiceStatus, void>({
      query: () => '/ai/voice/status',
      transformResponse: (response: any) => response.data,
    }),

    // Get available voices
    getAvailableVoices: builder.query<VoiceInfo[], void>({
      query: () => '/ai/voice/available-voices',
      transformResponse: (response: any) => response.data,
    }),

    // Process voice transcript (HTTP fallback)
    processVoiceTranscript: builder.mutation<
      { messageId: string; text: string },
      { transcript: string; chatId: string; userId?: string; modelName?: string }
    >({
      query: (body) => ({
        url: '/ai/voice/process-transcript',
        method: 'POST',
        body,
      }),
      transformResponse: (response: any) => response.data,
      invalidatesTags: (result, error, { chatId }) => [
        { type: 'Messages', id: chatId },
      ],
    }),
  }),
});

// Create WebRTC voice session hook (custom RTK hook)
export const useWebRTCVoice = () => {
  // Create and manage WebRTC logic using hooks
  const startVoiceSession = async (
    userId: string,
    chatId: string,
    onTranscript: (transcript: string) => void,
    onResponse: (response: { messageId: string; text: string }) => void
  ): Promise<VoiceSession> => {
    // Connect to Socket.io server
    const socket = io(process.env.VITE_API_URL || 'http://localhost:5000');
    
    // Return promise that resolves when session is established
    return new Promise((resolve, reject) => {
      socket.on('connect', () => {
        // Start voice session when socket connects
        socket.emit('start-voice-session', { userId, chatId });
        
        // Handle session started event
        socket.on('voice-session-started', (data) => {
          const session: VoiceSession = {
            sessionId: data.sessionId,
            socket,
            active: true,
            transcript: '',
            response: '',
          };
          resolve(session);
        });
        
        // Handle voice response event
        socket.on('voice-response', (data) => {
          onResponse(data);
        });
        
        // Handle error event
        socket.on('error', (error) => {
          reject(error);
        });
      });
      
      // Handle connection error
      socket.on('connect_error', (error) => {
        reject(error);
      });
    });
  };
  
  // Send voice transcript
  const sendVoiceTranscript = (
    session: VoiceSession, 
    transcript: string
  ): void => {
    if (session.socket && session.active) {
      session.socket.emit('voice-message', {
        sessionId: session.sessionId,
        transcript,
      });
    }
  };
  
  // End voice session
  const endVoiceSession = (session: VoiceSession): void => {
    if (session.socket) {
      session.socket.emit('end-voice-session', {
        sessionId: session.sessionId,
      });
      session.socket.disconnect();
    }
  };
  
  return {
    startVoiceSession,
    sendVoiceTranscript,
    endVoiceSession,
  };
};

// Export hooks
export const {
  useGetVoiceStatusQuery,
  useGetAvailableVoicesQuery,
  useProcessVoiceTranscriptMutation,
} = voiceApi;
