// The progress line of a running benchmark, on stderr: on a terminal one line that overwrites itself; in a pipe
// (a log file, CI) plain lines, one when the stage changes (scenario, round) and otherwise at most one every few
// seconds, so that a log shows where a run was without a line per request.

export class Progress {
  readonly #tty: boolean;
  readonly #stream: NodeJS.WriteStream;
  readonly #pipeIntervalMs: number;
  #lineShown = false;
  #lastStage: string | undefined;
  #lastPrintAt = 0;

  constructor(stream: NodeJS.WriteStream = process.stderr, pipeIntervalMs = 5_000) {
    this.#stream = stream;
    this.#tty = stream.isTTY === true;
    this.#pipeIntervalMs = pipeIntervalMs;
  }

  /** `stage`: where the run is (scenario, scheme, round); `detail`: what runs now (client, origin). */
  update(stage: string, detail = ''): void {
    const text = detail ? `${stage}: ${detail}` : stage;
    if (this.#tty) {
      const columns = this.#stream.columns ?? 120;
      this.#stream.write(`\r\x1b[K${text.slice(0, Math.max(10, columns - 1))}`);
      this.#lineShown = true;
      return;
    }
    const now = performance.now();
    if (stage === this.#lastStage && now - this.#lastPrintAt < this.#pipeIntervalMs) return;
    this.#lastStage = stage;
    this.#lastPrintAt = now;
    this.#stream.write(`[progress] ${text}\n`);
  }

  /** A line of the log: clears the progress line first on a terminal (the next update redraws it). */
  log(text: string): void {
    this.clear();
    this.#stream.write(`${text}\n`);
  }

  clear(): void {
    if (this.#tty && this.#lineShown) this.#stream.write('\r\x1b[K');
    this.#lineShown = false;
  }
}
