// The public API of the `sockpool` package.

export { type ErrorCode, ErrorCodes, SockpoolError } from '../shared/errors.js';
export type { TransferTimings } from '../worker/curl-engine.js';
export type { ResponseHead } from '../worker/stream-protocol.js';
export type { BodyStream } from './caller-channel.js';
export {
  defaultConcurrencyPerThread,
  defaultSocketPath,
  defaultThreads,
  type PrewarmGrant,
  SockpoolClient,
  type SockpoolClientOptions,
  type SockpoolResponse,
  type SockpoolStreamResponse,
  type SockpoolTimings,
} from './client.js';
export {
  type BodyInput,
  type HeadersInput,
  type PrewarmTarget,
  type RequestOptions,
  validateRequest,
} from './validate.js';
