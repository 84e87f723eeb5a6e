// KeptSockets (daemon/kept-sockets.ts) alone: the per-uid count and order of idle sockets kept for one uid, and which
// it closes past the bound. The pools' side (every way a kept socket leaves the idle set) is in pool-manager.test.ts,
// the daemon's in daemon-trust-accounting.test.ts.
import { describe, expect, it } from 'vitest';
import { KeptSockets } from '../daemon/kept-sockets.js';

/** A ledger over plain objects whose drop releases them as a pool's #drop does, recording the order. */
function ledger(limit: { value: number }) {
  const kept = new KeptSockets<{ name: string }>(() => limit.value);
  const dropped: string[] = [];
  const keep = (uid: number, name: string) => {
    const socket = { name };
    kept.keep(uid, socket, {
      dropKept: () => {
        dropped.push(name);
        kept.released(uid, socket);
      },
    });
    return socket;
  };
  return { kept, dropped, keep };
}

describe('KeptSockets', () => {
  it("closes a uid's oldest kept socket past its bound, never another uid's, and counts each uid apart", () => {
    const { kept, dropped, keep } = ledger({ value: 2 });
    keep(1, 'a1');
    keep(2, 'b1');
    keep(1, 'a2');
    expect(dropped).toEqual([]);
    keep(1, 'a3');
    expect(dropped).toEqual(['a1']);
    keep(1, 'a4');
    expect(dropped).toEqual(['a1', 'a2']);
    expect([kept.countOf(1), kept.countOf(2), kept.countOf(3), kept.total]).toEqual([2, 1, 0, 3]);
  });

  it('orders by the last keep: a socket lent again and kept anew is the newest', () => {
    const { kept, dropped, keep } = ledger({ value: 2 });
    const first = keep(1, 'first');
    keep(1, 'second');
    // Lent again to its uid (it leaves the idle set), then released unused once more: a new stay, the newest.
    kept.released(1, first);
    keep(1, 'first again');
    keep(1, 'third');
    expect(dropped).toEqual(['second']);
    expect(kept.countOf(1)).toBe(2);
  });

  it('forgets a socket released (lent or closed elsewhere); a second release, or one never kept, is a no-op', () => {
    const { kept, keep } = ledger({ value: 5 });
    const one = keep(7, 'one');
    kept.released(7, one);
    kept.released(7, one);
    kept.released(8, { name: 'never kept' });
    expect([kept.countOf(7), kept.total]).toEqual([0, 0]);
  });

  it('holds every uid to a lowered bound at trimAll, oldest first', () => {
    const limit = { value: 3 };
    const { kept, dropped, keep } = ledger(limit);
    for (const name of ['a1', 'a2', 'a3']) keep(1, name);
    for (const name of ['b1', 'b2']) keep(2, name);
    limit.value = 1;
    kept.trimAll();
    expect(dropped).toEqual(['a1', 'a2', 'b1']);
    expect([kept.countOf(1), kept.countOf(2)]).toEqual([1, 1]);
  });

  it('does not loop on a drop that fails to close its socket: the entry left before the drop ran', () => {
    const kept = new KeptSockets(() => 1);
    let drops = 0;
    const holder = { dropKept: () => drops++ };
    kept.keep(1, {}, holder);
    kept.keep(1, {}, holder);
    expect([drops, kept.countOf(1)]).toEqual([1, 1]);
  });
});
