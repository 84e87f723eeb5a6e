// What an acquire's `tokenTaken` may claim (daemon/fleet/token-claims.ts), on an injected clock: the tokens granted
// its uid for its origin, each once, within their lifetime; a claim whose acquire got no lease is claimable again
// until its own expiry only; and the bookkeeping a uid can make grow is bounded. (A real daemon and raw clients:
// test/daemon-trust-tokens.test.ts.)
import { describe, expect, it } from 'vitest';
import { BUCKET_MS, CLAIM_LIFETIME_MS, MAX_ORIGINS_PER_UID, TokenClaims } from '../daemon/fleet/token-claims.js';

function claimsAt() {
  const clock = { now: 1_000 };
  return { clock, claims: new TokenClaims(() => clock.now) };
}

describe('TokenClaims', () => {
  it('lets a uid claim the tokens granted it for that origin, each once, and no other uid or origin', () => {
    const { claims } = claimsAt();
    claims.grant(1, 'a:443', 2);
    expect(claims.claim(2, 'a:443')).toBeUndefined();
    expect(claims.claim(1, 'b:443')).toBeUndefined();
    expect(claims.claim(1, 'a:443')).toBeDefined();
    expect(claims.claim(1, 'a:443')).toBeDefined();
    expect(claims.claim(1, 'a:443')).toBeUndefined();
    // Nothing left: nothing kept.
    expect(claims.uids).toBe(0);
  });

  it('keeps each token claimable CLAIM_LIFETIME_MS after its grant, never less; tokens granted close together share one count', () => {
    const { clock, claims } = claimsAt();
    claims.grant(1, 'a:443', 1);
    clock.now += 40;
    claims.grant(1, 'a:443', 1);
    // One count for both (a count per few ms of grants, not a record per token), living as long as the later one
    // needs: an honest claim of it just before its lifetime ends is believed (it used to expire with the first).
    clock.now += CLAIM_LIFETIME_MS - 1;
    expect(claims.claim(1, 'a:443')).toBeDefined();
    expect(claims.claim(1, 'a:443')).toBeDefined();
    expect(claims.claim(1, 'a:443')).toBeUndefined();
    // Late by at most BUCKET_MS: past the later grant's lifetime plus that, both are gone.
    claims.grant(1, 'a:443', 1);
    clock.now += 40;
    claims.grant(1, 'a:443', 1);
    clock.now += CLAIM_LIFETIME_MS - 40 + BUCKET_MS;
    expect(claims.claim(1, 'a:443')).toBeUndefined();
    claims.grant(1, 'a:443', 1);
    clock.now += 500;
    claims.grant(1, 'a:443', 1);
    clock.now += CLAIM_LIFETIME_MS - 500 + BUCKET_MS;
    // The older is gone, the later one (granted 500 ms after: a count of its own) is left.
    expect(claims.claim(1, 'a:443')?.expiresAt).toBe(clock.now + 500);
    expect(claims.claim(1, 'a:443')).toBeUndefined();
  });

  it('makes a claim given back (its acquire got no lease) claimable again until its own expiry, never longer', () => {
    const { clock, claims } = claimsAt();
    claims.grant(1, 'a:443', 1);
    const claim = claims.claim(1, 'a:443')!;
    // (A count of its own lives BUCKET_MS longer, for the grants that may join it.)
    expect(claim).toEqual({ expiresAt: clock.now + CLAIM_LIFETIME_MS + BUCKET_MS, restored: false });
    clock.now += 600;
    claims.unclaim(1, 'a:443', claim);
    expect(claims.claim(1, 'a:443')).toEqual(claim);
    claims.unclaim(1, 'a:443', claim);
    clock.now = claim.expiresAt;
    expect(claims.claim(1, 'a:443')).toBeUndefined();
    // One given back after its expiry is dropped.
    claims.unclaim(1, 'a:443', claim);
    expect(claims.claim(1, 'a:443')).toBeUndefined();
  });

  it('keeps a claim given back after an unanswered lease apart, and hands the one expiring first', () => {
    const { clock, claims } = claimsAt();
    claims.grant(1, 'a:443', 1);
    const first = claims.claim(1, 'a:443')!;
    clock.now += 300;
    claims.grant(1, 'a:443', 1);
    claims.unclaim(1, 'a:443', { ...first, restored: true });
    // The restored one expires first: it goes first, and says it was restored (not given back that way again).
    expect(claims.claim(1, 'a:443')).toEqual({ expiresAt: first.expiresAt, restored: true });
    expect(claims.claim(1, 'a:443')).toEqual({ expiresAt: clock.now + CLAIM_LIFETIME_MS + BUCKET_MS, restored: false });
    expect(claims.claim(1, 'a:443')).toBeUndefined();
  });

  it('holds claimable tokens for at most MAX_ORIGINS_PER_UID origins a uid (the rest are charged), without touching another uid', () => {
    const { clock, claims } = claimsAt();
    claims.grant(2, 'other:443', 1);
    for (let i = 0; i < 2 * MAX_ORIGINS_PER_UID; i++) claims.grant(1, `o${i}:443`, 1);
    expect(claims.claim(1, 'o0:443')).toBeDefined();
    expect(claims.claim(1, `o${MAX_ORIGINS_PER_UID + 5}:443`)).toBeUndefined();
    expect(claims.claim(2, 'other:443')).toBeDefined();
    // Once they expired, the next grant's sweep frees them: the uid has room again, and nothing is left of the rest.
    clock.now += CLAIM_LIFETIME_MS + BUCKET_MS;
    claims.grant(1, 'new:443', 1);
    expect(claims.claim(1, 'new:443')).toBeDefined();
    expect(claims.uids).toBe(0);
  });
});
