// The benchmarks' SVG writer (bench/lib/svg.ts) and bench/peers.ts's charts on fixed input: the output parses as
// XML (a real parser, @xmldom/xmldom, that throws on any error or warning), there is one bar per client in each
// group, colours follow the client, and labels with XML's reserved characters arrive intact (escaped, not broken).
// No timing is involved: the charts are drawn from numbers given here.
import { DOMParser, type Element } from '@xmldom/xmldom';
import { describe, expect, it } from 'vitest';
import { type ChartSet, peersCharts } from '../bench/lib/peers-charts.js';
import { barChartSvg, groupedBarChartSvg } from '../bench/lib/svg.js';

function parse(svg: string) {
  const document = new DOMParser({
    onError: (level, message) => {
      throw new Error(`SVG not well-formed (${level}): ${message}`);
    },
  }).parseFromString(svg, 'image/svg+xml');
  const root = document.documentElement!;
  expect(root.tagName).toBe('svg');
  expect(root.getAttribute('xmlns')).toBe('http://www.w3.org/2000/svg');
  return root;
}

function all(root: Element, tag: string): Element[] {
  return Array.from(root.getElementsByTagName(tag));
}

function texts(root: Element): string[] {
  return all(root, 'text').map((text) => text.textContent ?? '');
}

function bars(root: Element): Element[] {
  return all(root, 'rect').filter((rect) => rect.getAttribute('class') === 'bar');
}

describe('grouped bar chart', () => {
  const hostile = `<b>"Tom's" & co</b>`;
  const svg = groupedBarChartSvg({
    title: 'First request <p50> & p90',
    subtitle: 'load average 1.0 at the start',
    unit: 'ms',
    groups: [
      {
        label: 'HTTP',
        bars: [
          { series: 'undici', value: 45.6, whisker: 50.2 },
          { series: hostile, value: 43.8, whisker: 49.2, text: '43.8 ms · 1.68×' },
          { series: 'sockpool', value: 26, whisker: 30.9 },
        ],
      },
      {
        label: 'HTTPS & friends',
        bars: [
          { series: 'undici', value: 70.7, whisker: 79.1 },
          { series: hostile, value: Number.NaN },
          { series: 'sockpool', value: 25.3, whisker: 30.6 },
        ],
      },
    ],
    note: 'Bar: p50; whisker: p90',
  });
  const root = parse(svg);

  it('is well-formed XML with the title, group labels and note as text', () => {
    expect(all(root, 'title')[0]?.textContent).toBe('First request <p50> & p90');
    expect(texts(root)).toEqual(
      expect.arrayContaining(['First request <p50> & p90', 'HTTP', 'HTTPS & friends', 'Bar: p50; whisker: p90']),
    );
  });

  it('draws one bar per client in each group and none for a missing value', () => {
    const drawn = bars(root).map((rect) => rect.getAttribute('data-series'));
    expect(drawn).toEqual(['undici', hostile, 'sockpool', 'undici', 'sockpool']);
    expect(texts(root).filter((text) => text === 'n/a')).toHaveLength(1);
    expect(all(root, 'path').filter((path) => path.getAttribute('class') === 'whisker')).toHaveLength(5);
  });

  it('keeps escaped labels intact and gives a client one colour in every group', () => {
    expect(texts(root).filter((text) => text === hostile)).toHaveLength(2);
    expect(svg).not.toContain(hostile);
    const fill = (series: string) =>
      new Set(
        bars(root)
          .filter((r) => r.getAttribute('data-series') === series)
          .map((r) => r.getAttribute('fill')),
      );
    expect(fill('undici').size).toBe(1);
    expect(fill('sockpool').size).toBe(1);
    expect([...fill('undici')][0]).not.toBe([...fill('sockpool')][0]);
  });

  it('gives one colour to a client whose label differs between groups (colourKey)', () => {
    const keyed = parse(
      groupedBarChartSvg({
        title: 't',
        unit: 'ms',
        groups: [
          {
            label: 'HTTP',
            bars: [
              { series: 'undici', value: 1 },
              { series: 'sockpool, warm TCP', value: 1, colourKey: 'sockpool' },
            ],
          },
          {
            label: 'HTTPS',
            bars: [
              { series: 'sockpool, warm TLS', value: 1, colourKey: 'sockpool' },
              { series: 'undici', value: 1 },
            ],
          },
        ],
      }),
    );
    const fills = bars(keyed).map((rect) => `${rect.getAttribute('data-series')}=${rect.getAttribute('fill')}`);
    const fillOf = (series: string) => fills.find((entry) => entry.startsWith(`${series}=`))!.split('=')[1];
    expect(fillOf('sockpool, warm TCP')).toBe(fillOf('sockpool, warm TLS'));
    expect(fillOf('sockpool, warm TCP')).not.toBe(fillOf('undici'));
  });

  it('draws bar lengths in proportion to the values on one axis', () => {
    const width = (series: string) =>
      bars(root)
        .filter((rect) => rect.getAttribute('data-series') === series)
        .map((rect) => Number(rect.getAttribute('width')));
    const [undiciHttp, undiciHttps] = width('undici');
    expect(undiciHttps! / undiciHttp!).toBeCloseTo(70.7 / 45.6, 2);
  });
});

describe('ratio bar chart (bench/relay.ts)', () => {
  it('is well-formed with escaped labels', () => {
    const root = parse(barChartSvg({ title: 'a < b', bars: [{ label: 'x & "y"', value: 0.5, aim: 0.8 }] }));
    expect(texts(root)).toEqual(expect.arrayContaining(['a < b', 'x & "y"', '0.50×']));
    expect(all(root, 'line').some((line) => line.getAttribute('stroke-dasharray') !== null)).toBe(true);
  });
});

describe('peers charts', () => {
  const run = (scheme: string, mode: string, variant: string, peer: string, perSecond: number[]) => ({
    scheme,
    mode,
    variant,
    peer: peer as 'libcurl',
    concurrency: mode === 'sequential' ? 1 : 16,
    perSecond: perSecond[1]!,
    elapsedMs: 1000 / perSecond[1]!,
    errors: 0,
    rounds: perSecond.map((value) => ({ perSecond: value })),
  });
  const first = (scheme: string, peer: string, p50: number) => ({
    scheme,
    peer: peer as 'libcurl',
    latency: { count: 40, p50, p90: p50 * 1.2 },
    ratioP50: p50 / 25,
    errors: 0,
  });
  const set: ChartSet = {
    name: 'lab',
    rttMs: 20,
    origins: 40,
    first: ['http', 'https'].flatMap((scheme) =>
      ['undici', 'libcurl', 'curl', 'sockpool'].map((peer, i) => first(scheme, peer, 25 + (3 - i) * 15)),
    ),
    keepAlive: [
      run('https', 'sequential', 'libcurl', 'libcurl', [900, 1000, 1100]),
      run('https', 'sequential', 'sockpool', 'sockpool', [450, 500, 550]),
      run('https', 'sequential', 'sockpool (baseline)', 'sockpool', [400, 400, 400]),
    ],
    crawl: [
      run('http', 'mix', 'undici', 'undici', [10, 10, 10]),
      run('http', 'mix', 'sockpool', 'sockpool', [20, 20, 20]),
      run('http', 'mix', 'sockpool-unannounced', 'sockpool', [18, 18, 18]),
    ],
    throughput: [],
  };
  const charts = peersCharts([set], {
    date: '2026-12-03T02:44:25.000Z',
    loadAverage: [7.8, 8.4],
    cpus: 2,
    warmTls: true,
  });

  it('writes one chart per scenario that ran, each well-formed with one bar per client', () => {
    expect(charts.map((chart) => chart.name)).toEqual(['lab-first', 'lab-keep-alive', 'lab-crawl']);
    const [firstChart, keepAliveChart, crawlChart] = charts.map((chart) => parse(chart.svg));
    expect(bars(firstChart!).map((rect) => rect.getAttribute('data-series'))).toEqual([
      'Node fetch (undici)',
      'node-libcurl',
      'curl CLI',
      'sockpool, warm TCP',
      'Node fetch (undici)',
      'node-libcurl',
      'curl CLI',
      'sockpool, warm TLS',
    ]);
    expect(bars(keepAliveChart!).map((rect) => rect.getAttribute('data-series'))).toEqual([
      'node-libcurl',
      'sockpool',
      'sockpool (baseline)',
    ]);
    expect(bars(crawlChart!).map((rect) => rect.getAttribute('data-series'))).toEqual([
      'Node fetch (undici)',
      'sockpool',
      'sockpool, hosts not announced',
    ]);
  });

  it('says the load average and the ratios beside the bars', () => {
    const [firstChart, keepAliveChart] = charts.map((chart) => parse(chart.svg));
    expect(texts(firstChart!).some((text) => text.includes('load average 7.8 at the start, 8.4 at the end'))).toBe(
      true,
    );
    // Keep-alive: the median of the per-round ratios to node-libcurl (0.5 in every round).
    expect(texts(keepAliveChart!)).toContain('500 req/s · 0.50×');
  });
});
