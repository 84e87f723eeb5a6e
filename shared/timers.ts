// Node's timers: the longest delay setTimeout honours. A longer one runs after 1 ms, with only a
// TimeoutOverflowWarning, so every duration that ends up in a timer (a configuration key, a request's timeoutMs) is
// bounded by it where it is accepted. (It is also TCP_USER_TIMEOUT's bound: a C int.)

/** 2^31 − 1 ms, about 24.8 days. */
export const MAX_TIMER_MS = 2 ** 31 - 1;
