// The public API of the `sockpool` package.

export { type ErrorCode, ErrorCodes, SockpoolError } from '../shared/errors.js';
export {
  defaultSocketPath,
  type RequestOptions,
  SockpoolClient,
  type SockpoolClientOptions,
  type SockpoolResponse,
  validateRequest,
} from './client.js';
