// The public API of the `sockpool` package.
export {
  defaultSocketPath,
  type RequestOptions,
  SockpoolClient,
  type SockpoolClientOptions,
  type SockpoolResponse,
  validateRequest,
} from './client.js';
export { ErrorCodes, type ErrorCode, SockpoolError } from '../shared/errors.js';
