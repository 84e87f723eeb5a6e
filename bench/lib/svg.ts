// Small SVG charts for the benchmarks, written by hand (no dependency): horizontal bars, either one bar per line
// with an aim marker (ratios, bench/relay.ts) or bars in groups, one series (client) per colour, with an optional
// second value drawn as a whisker (p50 bar, p90 whisker) and a text beside each bar (bench/peers.ts).

export interface Bar {
  label: string;
  value: number;
  /** Drawn as a dashed line across the bar's lane. */
  aim?: number;
}

/** Text for element content and attribute values: the five characters XML reserves. */
export function escapeXml(text: string): string {
  return text
    .replace(/&/g, '&amp;')
    .replace(/</g, '&lt;')
    .replace(/>/g, '&gt;')
    .replace(/"/g, '&quot;')
    .replace(/'/g, '&apos;');
}

export function barChartSvg(chart: { title: string; bars: Bar[] }): string {
  const width = 720;
  const left = 300;
  const lane = 36;
  const top = 40;
  const height = top + chart.bars.length * lane + 30;
  const max = Math.max(1, ...chart.bars.flatMap((bar) => [bar.value, bar.aim ?? 0])) * 1.1;
  const x = (value: number) => left + (value / max) * (width - left - 60);
  const parts = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" font-family="sans-serif" font-size="13">`,
    `<rect width="${width}" height="${height}" fill="white"/>`,
    `<text x="10" y="22" font-size="15" font-weight="bold">${escapeXml(chart.title)}</text>`,
  ];
  chart.bars.forEach((bar, i) => {
    const y = top + i * lane;
    parts.push(`<text x="10" y="${y + 20}">${escapeXml(bar.label)}</text>`);
    parts.push(`<rect x="${left}" y="${y + 6}" width="${x(bar.value) - left}" height="${lane - 14}" fill="#4c78a8"/>`);
    parts.push(`<text x="${x(bar.value) + 6}" y="${y + 20}">${bar.value.toFixed(2)}×</text>`);
    if (bar.aim !== undefined) {
      parts.push(
        `<line x1="${x(bar.aim)}" x2="${x(bar.aim)}" y1="${y + 2}" y2="${y + lane - 4}" stroke="#e45756" stroke-width="2" stroke-dasharray="4 3"/>`,
      );
    }
  });
  const axis = top + chart.bars.length * lane + 4;
  parts.push(`<line x1="${x(1)}" x2="${x(1)}" y1="${top}" y2="${axis}" stroke="#888"/>`);
  parts.push(`<text x="${x(1) - 10}" y="${axis + 16}" fill="#555">1×</text>`);
  parts.push(`<text x="${width - 200}" y="${axis + 16}" fill="#e45756">dashed: aim</text>`);
  parts.push('</svg>');
  return `${parts.join('\n')}\n`;
}

export interface GroupBar {
  /** The series (client): bars of one series have one colour in every group. */
  series: string;
  /** What picks the colour when the series' name differs between groups for one client (default: `series`). */
  colourKey?: string;
  /** NaN or Infinity (no result): no bar, the text says n/a. */
  value: number;
  /** A second, larger value of the same row (p90 beside a p50 bar): a whisker from the bar's end. */
  whisker?: number;
  /** Beside the bar (defaults to the value). */
  text?: string;
}

export interface BarGroup {
  label: string;
  bars: GroupBar[];
}

export interface GroupedBarChart {
  title: string;
  /** Under the title: what was run, when, the machine's load. */
  subtitle?: string;
  /** The axis: what the values are ("ms", "req/s"). */
  unit: string;
  groups: BarGroup[];
  /** At the foot: how to read it (what the whisker is, which way is better). */
  note?: string;
}

const PALETTE = ['#4c78a8', '#f58518', '#54a24b', '#b279a2', '#e45756', '#72b7b2', '#9d755d', '#bab0ac'];

/** A step of 1, 2 or 5 × 10^n that cuts 0..max into about `count` parts. */
function niceStep(max: number, count: number): number {
  const raw = max / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const scaled = raw / power;
  return (scaled <= 1 ? 1 : scaled <= 2 ? 2 : scaled <= 5 ? 5 : 10) * power;
}

function formatTick(value: number): string {
  return Math.abs(value) >= 1000 ? value.toLocaleString('en-US') : String(Number(value.toPrecision(6)));
}

/**
 * Bars in groups (a scheme, a mode), one lane per series inside each group, every bar from zero on one shared
 * axis. Each bar and whisker carries `data-series` (the series' name), so a reader or a test can find them.
 */
export function groupedBarChartSvg(chart: GroupedBarChart): string {
  const width = 860;
  const left = 230;
  const right = 190;
  const lane = 24;
  const groupHead = 26;
  const top = chart.subtitle ? 62 : 44;
  const finite = (value: number | undefined): value is number => value !== undefined && Number.isFinite(value);
  const values = chart.groups.flatMap((group) => group.bars.flatMap((bar) => [bar.value, bar.whisker]));
  const max = Math.max(Number.MIN_VALUE, ...values.filter(finite));
  const step = niceStep(max, 5);
  const axisMax = Math.ceil(max / step) * step;
  const x = (value: number) => left + (Math.max(0, value) / axisMax) * (width - left - right);
  const plotHeight = chart.groups.reduce((sum, group) => sum + groupHead + group.bars.length * lane, 0);
  const axisY = top + plotHeight + 6;
  const height = axisY + 34 + (chart.note ? 20 : 0);
  const colours = new Map<string, string>();
  const colour = (series: string) => {
    if (!colours.has(series)) colours.set(series, PALETTE[colours.size % PALETTE.length]!);
    return colours.get(series)!;
  };

  const parts = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="12">`,
    `<title>${escapeXml(chart.title)}</title>`,
    `<rect width="${width}" height="${height}" fill="white"/>`,
    `<text x="10" y="22" font-size="15" font-weight="bold">${escapeXml(chart.title)}</text>`,
  ];
  if (chart.subtitle) parts.push(`<text x="10" y="42" fill="#555">${escapeXml(chart.subtitle)}</text>`);
  for (let tick = 0; tick <= axisMax + step / 2; tick += step) {
    parts.push(
      `<line x1="${x(tick)}" x2="${x(tick)}" y1="${top}" y2="${axisY}" stroke="#ddd"/>`,
      `<text x="${x(tick)}" y="${axisY + 14}" text-anchor="middle" fill="#555">${formatTick(tick)}</text>`,
    );
  }
  // The unit after the last tick's number (centred on its tick: about 3.5 px per character either side).
  const unitX = x(axisMax) + 6 + 3.5 * formatTick(axisMax).length;
  parts.push(`<text x="${unitX.toFixed(1)}" y="${axisY + 14}" fill="#555">${escapeXml(chart.unit)}</text>`);
  let y = top;
  for (const group of chart.groups) {
    parts.push(`<text x="10" y="${y + 18}" font-weight="bold">${escapeXml(group.label)}</text>`);
    y += groupHead;
    for (const bar of group.bars) {
      const series = escapeXml(bar.series);
      const fill = colour(bar.colourKey ?? bar.series);
      parts.push(`<text x="22" y="${y + 16}">${series}</text>`);
      let end = left;
      if (finite(bar.value)) {
        end = x(bar.value);
        parts.push(
          `<rect class="bar" data-series="${series}" x="${left}" y="${y + 4}" width="${(end - left).toFixed(1)}" height="${lane - 8}" fill="${fill}"/>`,
        );
      }
      if (finite(bar.whisker) && finite(bar.value)) {
        const tip = x(bar.whisker);
        const mid = y + lane / 2;
        parts.push(
          `<path class="whisker" data-series="${series}" d="M${end.toFixed(1)} ${mid}H${tip.toFixed(1)}M${tip.toFixed(1)} ${mid - 6}V${mid + 6}" stroke="#333" fill="none"/>`,
        );
        end = Math.max(end, tip);
      }
      const text = bar.text ?? (finite(bar.value) ? formatTick(bar.value) : 'n/a');
      parts.push(`<text x="${(end + 6).toFixed(1)}" y="${y + 16}">${escapeXml(text)}</text>`);
      y += lane;
    }
  }
  parts.push(`<line x1="${left}" x2="${left}" y1="${top}" y2="${axisY}" stroke="#888"/>`);
  if (chart.note) parts.push(`<text x="10" y="${axisY + 36}" fill="#555">${escapeXml(chart.note)}</text>`);
  parts.push('</svg>');
  return `${parts.join('\n')}\n`;
}
