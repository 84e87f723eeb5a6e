// The addon's errors name their errno as Node does (`code`, e.g. ECONNRESET), including the errnos libuv has no name
// for: it calls those "Unknown system error <n>", and the daemon's log read `sendmsg Unknown system error -109` where
// the kernel had refused a send past the fds-in-flight limit. System tier: the child runs as another user.
import { fileURLToPath } from 'node:url';
import { beforeAll, expect, it } from 'vitest';
import { warmUpChildProcesses } from './fixtures/native-helpers.js';
import { runChildToEnd } from './helpers/children.js';

const tooManyRefsFixture = fileURLToPath(new URL('./fixtures/native-too-many-refs.mjs', import.meta.url));
/** A uid no other test uses: the kernel counts fds in flight per user, so others' sends neither add to the child's
 *  count nor meet its fds in theirs. */
const OWN_UID = 61_234;
/** The child's RLIMIT_NOFILE: the kernel refuses a send once more fds than this are in flight. */
const NOFILE = 64;

beforeAll(async () => {
  await warmUpChildProcesses();
});

it("names ETOOMANYREFS, which libuv cannot: a send of fds past the user's in-flight limit", async () => {
  // Not root, so without CAP_SYS_RESOURCE or CAP_SYS_ADMIN, which lift the limit.
  const { code, stdout } = await runChildToEnd(
    'prlimit',
    [`--nofile=${NOFILE}:${NOFILE}`, '--', process.execPath, tooManyRefsFixture, '200'],
    { uid: OWN_UID, gid: OWN_UID },
  );
  expect(code).toBe(0);
  expect(JSON.parse(stdout)).toEqual({
    sent: NOFILE + 1,
    thrown: true,
    code: 'ETOOMANYREFS',
    errno: -109,
    syscall: 'sendmsg',
    message: 'sendmsg ETOOMANYREFS',
  });
});
