// The fleet's Prometheus metrics, read at scrape time from the Fleet (nothing on the hot path). Registered whether or
// not a fleet is configured: `sockpool_fleet_up` then reads -1 (no fleet) and the counters stay at 0.

import { Gauge, type Registry } from 'prom-client';
import { runningTotal } from '../metrics.js';
import type { Fleet, FleetCounters } from './fleet.js';
import type { RateLimiter } from './rate-limiter.js';

export function registerFleetMetrics(registry: Registry, fleet: () => Fleet | undefined, rates: RateLimiter): void {
  // Running counts (they only grow): counters, so that rate() and increase() take a restart's reset for what it is.
  const total = (name: string, help: string, read: () => number) => runningTotal(registry, name, help, read);
  total(
    'sockpool_rate_tokens_granted_total',
    'Request tokens granted for rate-limited origins',
    () => rates.counters.granted,
  );
  total('sockpool_rate_limited_total', 'Requests refused with SOCKPOOL_ERR_RATE_LIMITED', () => rates.counters.limited);
  total('sockpool_rate_waits_total', 'Requests that waited for a token', () => rates.counters.waits);
  const gauge = (name: string, help: string, read: (fleet: Fleet) => number, none = 0) =>
    new Gauge({
      name,
      help,
      registers: [registry],
      collect() {
        const current = fleet();
        this.set(current ? read(current) : none);
      },
    });
  gauge(
    'sockpool_fleet_up',
    "1 while the fleet's Redis answers, 0 while it is unavailable, -1 without a fleet",
    (f) => (f.available ? 1 : 0),
    -1,
  );
  gauge('sockpool_fleet_members', 'Live daemons of the fleet at the last heartbeat', (f) => f.members);
  gauge('sockpool_fleet_slots_held', 'Connection slots this daemon holds under maxPerOriginFleet', (f) =>
    f.heldTotal(),
  );
  const counter = (key: keyof FleetCounters, name: string, help: string) =>
    total(name, help, () => fleet()?.counters[key] ?? 0);
  counter('outages', 'sockpool_fleet_outages_total', 'Times the fleet’s Redis became unavailable');
  counter(
    'fallbackSlots',
    'sockpool_fleet_fallback_slots_total',
    "Slot decisions taken on this daemon's share alone while Redis was unavailable",
  );
  counter(
    'fallbackTokens',
    'sockpool_fleet_fallback_tokens_total',
    "Request tokens granted from this daemon's share alone while Redis was unavailable",
  );
  counter('refused', 'sockpool_fleet_refused_total', 'Connects and token requests refused while Redis was unavailable');
  counter('slotWaits', 'sockpool_fleet_slot_waits_total', "Connects that waited for a slot under the fleet's cap");
}
