// Imported first by the scripts every README command runs (scripts/build-native.mjs, scripts/ensure-test-tools.mjs):
// under an npm older than 9 they stop at once, naming what is needed. npm 8 installs this project, but it does not
// know the lockfile's `libc` fields: it rewrites package-lock.json (a tracked file) and installs the musl builds
// of biome and rollup beside the glibc ones. `npm install` itself cannot be stopped earlier: the project's .npmrc
// turns install scripts off, and `engine-strict` would also refuse the Node that runs npm (the project brings its
// own Node 24; package.json's `engines.npm` makes npm warn during the install).
//
// npm says which npm runs a script in npm_config_user_agent ("npm/8.19.4 node/v18.20.8 linux x64 ..."); a script
// started by hand, without npm, is not checked.

const MIN_NPM_MAJOR = 9;

const agent = process.env.npm_config_user_agent ?? '';
const version = /^npm\/(\d+)\.(\d+)\.(\d+)/.exec(agent);
if (version && Number(version[1]) < MIN_NPM_MAJOR) {
  const running = `${version[1]}.${version[2]}.${version[3]}`;
  console.error(
    `sockpool needs npm ${MIN_NPM_MAJOR} or later; this is npm ${running}.\n` +
      `Install a newer npm (for example: npm install -g npm@10), then run \`git checkout package-lock.json\` ` +
      `(npm ${running} rewrote it) and \`npm install\` again.`,
  );
  process.exit(1);
}
