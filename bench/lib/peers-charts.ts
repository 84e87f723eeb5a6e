// The SVG charts of bench/peers.ts, one per scenario and set, written next to the run's JSON: first requests
// (p50 bars with a p90 whisker per client, per scheme), keep-alive (req/s with the ratio to node-libcurl), the
// crawler mix (total time with the ratio to sockpool), loopback throughput (req/s with the ratio to undici).
// They read the shapes the JSON holds, so `peers.js --charts-from FILE` redraws them from an old result file.

import type { PeerName } from '../fixtures/peer-runner.js';
import { median } from './stats.js';
import { type BarGroup, type GroupedBarChart, groupedBarChartSvg } from './svg.js';

export const PEER_LABEL: Record<PeerName, string> = {
  undici: 'Node fetch (undici)',
  libcurl: 'node-libcurl',
  curl: 'curl CLI',
  sockpool: 'sockpool',
  'sockpool-inline': 'sockpool, threads: 0',
  'sockpool-threads': 'sockpool, in company on threads',
};

export function variantLabel(variant: string): string {
  if (variant.endsWith(' (baseline)')) return `${variantLabel(variant.slice(0, -' (baseline)'.length))} (baseline)`;
  if (variant === 'sockpool-unannounced') return 'sockpool, hosts not announced';
  return PEER_LABEL[variant as PeerName] ?? variant;
}

/** `run`'s req/s over `base`'s, round by round (rounds without a partner left out). */
export function roundRatios(run: ChartRun, base: ChartRun | undefined): number[] {
  if (!base) return [];
  const ratios = run.rounds.map((round, r) => round.perSecond / (base.rounds[r]?.perSecond ?? Number.NaN));
  return ratios.filter((ratio) => Number.isFinite(ratio));
}

export interface ChartFirstRow {
  scheme: string;
  peer: PeerName;
  latency: { count: number; p50: number; p90: number };
  ratioP50: number;
  errors: number;
}

export interface ChartRun {
  scheme: string;
  mode: string;
  variant: string;
  peer: PeerName;
  concurrency: number;
  perSecond: number;
  elapsedMs: number;
  errors: number;
  rounds: Array<{ perSecond: number }>;
}

export interface ChartSet {
  name: string;
  rttMs: number | null;
  origins: number;
  first: ChartFirstRow[];
  keepAlive: ChartRun[];
  crawl: ChartRun[];
  throughput: ChartRun[];
}

export interface ChartContext {
  /** The run's start (ISO). */
  date: string;
  /** 1-minute load averages at the start and the end of the run. */
  loadAverage: [number, number];
  cpus: number;
  warmTls: boolean;
}

export interface NamedChart {
  /** The file name's tail: `<set>-<scenario>` (lab-first, loopback-keep-alive...). */
  name: string;
  svg: string;
}

function setTitle(set: ChartSet): string {
  return set.name === 'lab' ? `lab, ${set.rttMs} ms round trip` : 'loopback';
}

function subtitle(set: ChartSet, context: ChartContext, what: string): string {
  const [start, end] = context.loadAverage;
  return (
    `${setTitle(set)}; ${what}; ${context.date.slice(0, 16).replace('T', ' ')} UTC; load average ` +
    `${start.toFixed(1)} at the start, ${end.toFixed(1)} at the end (${context.cpus} CPUs)`
  );
}

function num(value: number, digits: number): string {
  return Number.isFinite(value) ? value.toFixed(digits) : 'n/a';
}

function perSecondText(value: number): string {
  return Number.isFinite(value) ? Math.round(value).toLocaleString('en-US') : 'n/a';
}

function errorsText(errors: number): string {
  return errors > 0 ? `; ${errors} errors` : '';
}

/** How sockpool got its first connection: over a socket (http) or a TLS session (https, --warm-tls) it warmed. */
function firstLabel(row: ChartFirstRow, warmTls: boolean): string {
  if (row.peer !== 'sockpool') return PEER_LABEL[row.peer];
  if (row.scheme === 'https') return warmTls ? 'sockpool, warm TLS' : 'sockpool, warm TCP (own TLS)';
  return 'sockpool, warm TCP';
}

export function firstRequestChart(set: ChartSet, context: ChartContext): GroupedBarChart {
  const schemes = [...new Set(set.first.map((row) => row.scheme))];
  const groups: BarGroup[] = schemes.map((scheme) => ({
    label: scheme.toUpperCase(),
    bars: set.first
      .filter((row) => row.scheme === scheme)
      .map((row) => ({
        series: firstLabel(row, context.warmTls),
        // sockpool's label says how it connected, which differs per scheme: one colour for it all the same.
        colourKey: row.peer,
        value: row.latency.p50,
        whisker: row.latency.p90,
        text:
          `${num(row.latency.p50, 1)} / ${num(row.latency.p90, 1)} ms` +
          (row.peer === 'sockpool' ? '' : ` · ${num(row.ratioP50, 2)}×`) +
          errorsText(row.errors),
      })),
  }));
  return {
    title: 'First request to each origin: peers cold, sockpool warm',
    subtitle: subtitle(set, context, `${set.origins} origins`),
    unit: 'ms',
    groups,
    note: 'Bar: p50; whisker: p90; lower is better. × = the peer’s p50 over sockpool’s.',
  };
}

export function keepAliveChart(set: ChartSet, context: ChartContext): GroupedBarChart {
  const keys = [...new Set(set.keepAlive.map((run) => `${run.scheme}\n${run.mode}`))];
  const groups: BarGroup[] = keys.map((key) => {
    const runs = set.keepAlive.filter((run) => `${run.scheme}\n${run.mode}` === key);
    const libcurl = runs.find((run) => run.peer === 'libcurl');
    const first = runs[0]!;
    return {
      label: `${first.scheme.toUpperCase()}, ${first.mode} (${first.concurrency} in flight)`,
      bars: runs.map((run) => ({
        series: variantLabel(run.variant),
        value: run.perSecond,
        text:
          `${perSecondText(run.perSecond)} req/s` +
          (run.peer === 'libcurl' ? '' : ` · ${num(median(roundRatios(run, libcurl)), 2)}×`) +
          errorsText(run.errors),
      })),
    };
  });
  return {
    title: 'Steady keep-alive to one origin',
    subtitle: subtitle(set, context, 'median of rounds'),
    unit: 'req/s',
    groups,
    note: 'Higher is better. × = the client’s req/s over node-libcurl’s, the median of the per-round ratios.',
  };
}

export function crawlChart(set: ChartSet, context: ChartContext): GroupedBarChart {
  const schemes = [...new Set(set.crawl.map((run) => run.scheme))];
  const groups: BarGroup[] = schemes.map((scheme) => {
    const runs = set.crawl.filter((run) => run.scheme === scheme);
    const sockpool = runs.find((run) => run.variant === 'sockpool');
    return {
      label: scheme.toUpperCase(),
      bars: runs.map((run) => ({
        series: variantLabel(run.variant),
        value: run.elapsedMs,
        text:
          `${num(run.elapsedMs, 0)} ms` +
          (run.variant === 'sockpool' ? '' : ` · ${num(run.elapsedMs / (sockpool?.elapsedMs ?? Number.NaN), 2)}×`) +
          errorsText(run.errors),
      })),
    };
  });
  const concurrency = set.crawl[0]?.concurrency ?? 0;
  return {
    title: `Crawler mix: Zipf over ${set.origins} origins, ${concurrency} in flight`,
    subtitle: subtitle(set, context, 'total time, median of rounds'),
    unit: 'ms',
    groups,
    note: 'Lower is better. × = the client’s total time over sockpool’s (hosts announced).',
  };
}

export function throughputChart(set: ChartSet, context: ChartContext): GroupedBarChart {
  const undici = set.throughput.find((run) => run.peer === 'undici');
  const concurrency = set.throughput[0]?.concurrency ?? 0;
  return {
    title: 'Loopback throughput, HTTP',
    subtitle: subtitle(set, context, 'median of rounds'),
    unit: 'req/s',
    groups: [
      {
        label: `HTTP, ${concurrency} in flight`,
        bars: set.throughput.map((run) => ({
          series: variantLabel(run.variant),
          value: run.perSecond,
          text:
            `${perSecondText(run.perSecond)} req/s` +
            (run.peer === 'undici' ? '' : ` · ${num(median(roundRatios(run, undici)), 2)}×`) +
            errorsText(run.errors),
        })),
      },
    ],
    note: 'Higher is better. × = the client’s req/s over undici’s, the median of the per-round ratios.',
  };
}

/** Every chart of a run: one per scenario that ran, per set. */
export function peersCharts(sets: ChartSet[], context: ChartContext): NamedChart[] {
  const charts: NamedChart[] = [];
  for (const set of sets) {
    if (set.first.length > 0)
      charts.push({ name: `${set.name}-first`, svg: groupedBarChartSvg(firstRequestChart(set, context)) });
    if (set.keepAlive.length > 0) {
      charts.push({ name: `${set.name}-keep-alive`, svg: groupedBarChartSvg(keepAliveChart(set, context)) });
    }
    if (set.crawl.length > 0)
      charts.push({ name: `${set.name}-crawl`, svg: groupedBarChartSvg(crawlChart(set, context)) });
    if (set.throughput.length > 0) {
      charts.push({ name: `${set.name}-throughput`, svg: groupedBarChartSvg(throughputChart(set, context)) });
    }
  }
  return charts;
}
