// The documents name the test behind each promise (docs/security.md's tables above all) by file and title; files
// were split and titles renamed over the sessions, and a citation of a test that no longer exists backs nothing.
// This reads the documents and the cited test files (no process, no import of the tests) and checks every citation.
//
// A citation is `test/NAME.test.ts` (backticks or not; NOTES.md also writes `test/NAME`, `test/NAME.system`) in
// docs/*.md, NOTES.md or README.md. Its file must exist. Its titles are the double-quoted strings in the parenthesis
// right after it that open it or follow a separator (`file` ("a", "b"; "c" › "d": words; the filtering: "e")), or
// the quoted strings right after it in prose (`file` "a", or `file`, "a", "b"). Not titles: a quote after a word
// (`failed first with "DNS resolution … timed out"` quotes an error), in a code span, after another test file named
// in the same parenthesis, or further away in prose (a few in NOTES.md; check those by hand). `\"` is a quote.
// Each title must be the title of an it()/test() or describe() in that file; "A › B" is a describe titled A holding
// (anywhere inside it) a test or describe titled B.
// Matching: whitespace runs count as one space; otherwise exact, with one abbreviation: "…" in a cited title stands
// for any text (none too), so "abc…" is a prefix, "…xyz" an ending, "a … b" two fragments in order. A title cut
// short without "…" fails: write the "…" (a reader can then tell a quote from a shortened one). A title the test
// builds is matched on its literal parts: `${…}` of a template, a `+` operand that is not a literal, and in an
// .each() title the %s/%d/%j/…/$name placeholders stand for any text (a loop's titles are checked as one pattern,
// not per value). A title that is no literal at all (a variable) could match anything and is not counted: a citation
// only such a title could back belongs in UNVERIFIABLE, with why.
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const root = fileURLToPath(new URL('..', import.meta.url));

/** Citations that cannot be checked from the test's source (file as cited: 'test/NAME.test.ts'; title as quoted,
 * a path joined with ' › '), each with why. Kept as small as possible: an entry nothing needs fails the test. */
const UNVERIFIABLE: ReadonlyArray<{ doc: string; file: string; title: string; reason: string }> = [];

const ANY = Symbol('any text');
type Pattern = Array<string | typeof ANY>;

interface Title {
  kind: 'describe' | 'test';
  pattern: Pattern;
  /** Offsets of the call's parentheses in the source: what a describe holds lies between them. */
  start: number;
  end: number;
}

interface Citation {
  doc: string;
  line: number;
  file: string;
  /** Each a path of quoted titles ("A › B" is [A, B]). */
  titles: string[][];
}

// ---- The documents

function documents(): string[] {
  const docs = readdirSync(join(root, 'docs'))
    .filter((name) => name.endsWith('.md'))
    .map((name) => `docs/${name}`);
  return [...docs, 'NOTES.md', 'README.md'];
}

// `test/NAME.test.ts`, or NOTES.md's short `test/NAME` (`test/fleet.system`), not test/fixtures/… or test/x.ts.
const CITED_FILE = /`?\btest\/([a-z0-9_-]+(?:\.system)?)(?:\.test\.ts\b|(?![\w/-]|\.\w))`?/g;
const ANOTHER_FILE = /^test\/[a-z0-9_-]+(?:\.system)?(?:\.test\.ts\b|(?![\w/-]|\.\w))/;

/** In a parenthesis, a title opens it or follows a separator: `("a", "b"; "c" › "d"; the filtering: "e")`, not
 * words (`failed first with "DNS resolution of x timed out"` quotes an error, not a test). */
const TITLE_FOLLOWS = /[(,;:›]\s*$/;

/** Reads a double-quoted string at `at` (the opening quote); returns its text and the offset after it. */
function quoted(text: string, at: number): { value: string; next: number } | undefined {
  let value = '';
  for (let i = at + 1; i < text.length; i++) {
    const char = text[i]!;
    if (char === '\\' && i + 1 < text.length) value += text[++i];
    else if (char === '"') return { value, next: i + 1 };
    else value += char;
  }
  return undefined;
}

function citationsIn(doc: string, text: string): Citation[] {
  const lineStarts = [0, ...[...text.matchAll(/\n/g)].map((newline) => newline.index + 1)];
  const lineAt = (offset: number) => lineStarts.findLastIndex((start) => start <= offset) + 1;
  const citations: Citation[] = [];
  for (const match of text.matchAll(CITED_FILE)) {
    const titles: string[][] = [];
    let i = match.index + match[0].length;
    while (/\s/.test(text[i] ?? '')) i++;
    const add = (title: string, joined: boolean) => {
      const last = titles.at(-1);
      if (joined && last) last.push(title);
      else titles.push([title]);
    };
    if (text[i] === '(') {
      let depth = 0;
      let joined = false;
      for (; i < text.length; i++) {
        const char = text[i]!;
        if (char === '(') depth++;
        else if (char === ')' && --depth === 0) break;
        else if (char === '`') {
          const close = text.indexOf('`', i + 1);
          if (close < 0 || ANOTHER_FILE.test(text.slice(i + 1, close))) break;
          i = close;
        } else if (char === '\\') i++;
        else if (char === '"') {
          const title = quoted(text, i);
          if (!title) break;
          if (TITLE_FOLLOWS.test(text.slice(Math.max(0, i - 40), i))) add(title.value, joined);
          i = title.next - 1;
          joined = /^\s*›\s*"/.test(text.slice(title.next, title.next + 20));
        } else if (text.startsWith('test/', i) && ANOTHER_FILE.test(text.slice(i, i + 100))) {
          break;
        }
      }
    } else {
      let next = /^,?\s*"/.exec(text.slice(i, i + 20));
      while (next) {
        const title = quoted(text, i + next[0].length - 1);
        if (!title) break;
        add(title.value, false);
        i = title.next;
        next = /^,\s*"/.exec(text.slice(i, i + 20));
      }
    }
    citations.push({ doc, line: lineAt(match.index), file: `${match[1]!}.test.ts`, titles });
  }
  return citations;
}

// ---- The test files: a small scanner (strings, templates, comments, regular expressions) and the titles in them

interface Token {
  type: 'word' | 'punct' | 'string' | 'template';
  /** The word, the punctuator, or for a string the pattern of its text. */
  value: string;
  pattern?: Pattern;
  at: number;
}

const REGEX_AFTER_WORD = new Set(['return', 'typeof', 'instanceof', 'in', 'of', 'new', 'delete', 'void', 'throw']);
const ESCAPES: Record<string, string> = { n: '\n', t: '\t', r: '\r', b: '\b', f: '\f', v: '\v', 0: '\0' };

function unescapeJs(raw: string): string {
  return raw.replace(/\\(u\{[0-9a-fA-F]+\}|u[0-9a-fA-F]{4}|x[0-9a-fA-F]{2}|\r?\n|.)/g, (_, sequence: string) => {
    if (/^u\{/.test(sequence)) return String.fromCodePoint(Number.parseInt(sequence.slice(2, -1), 16));
    if (/^[ux][0-9a-fA-F]/.test(sequence)) return String.fromCharCode(Number.parseInt(sequence.slice(1), 16));
    if (sequence.startsWith('\n') || sequence.startsWith('\r')) return '';
    return ESCAPES[sequence] ?? sequence;
  });
}

function tokenize(source: string): Token[] {
  const tokens: Token[] = [];
  let i = 0;
  /** Scans a template literal from its backquote; returns its pattern (each `${…}` any text) and the end. */
  const template = (from: number): { pattern: Pattern; next: number } => {
    const pattern: Pattern = [];
    let raw = '';
    let j = from + 1;
    while (j < source.length) {
      const char = source[j]!;
      if (char === '\\') {
        raw += source.slice(j, j + 2);
        j += 2;
      } else if (char === '`') {
        pattern.push(unescapeJs(raw));
        return { pattern, next: j + 1 };
      } else if (char === '$' && source[j + 1] === '{') {
        pattern.push(unescapeJs(raw), ANY);
        raw = '';
        j = skipExpression(j + 2);
      } else {
        raw += char;
        j++;
      }
    }
    return { pattern, next: j };
  };
  /** Skips the expression of a `${…}` up to and past its closing brace. */
  const skipExpression = (from: number): number => {
    let depth = 1;
    let j = from;
    while (j < source.length) {
      const char = source[j]!;
      if (char === '`') j = template(j).next;
      else if (char === "'" || char === '"') j = skipString(j);
      else {
        if (char === '{') depth++;
        else if (char === '}' && --depth === 0) return j + 1;
        j++;
      }
    }
    return j;
  };
  const skipString = (from: number): number => {
    const quote = source[from];
    let j = from + 1;
    while (j < source.length && source[j] !== quote) j += source[j] === '\\' ? 2 : 1;
    return j + 1;
  };
  // A `/` after a value (a word but a keyword, a string, a closing bracket) divides; elsewhere it opens a regex.
  let regexAllowed = true;
  // Blanks and comments; operators that matter to nothing here but the `/` after them (kept as no token); a word;
  // or one character that starts a string, template, regular expression, or a punctuator the titles' reading needs.
  const lexeme = /(\s+|\/\/[^\n]*|\/\*[\s\S]*?(?:\*\/|$))|([^\s\w$'"`/()[\]{}.+]+)|([A-Za-z_$0-9]+)|([\s\S])/y;
  while (i < source.length) {
    lexeme.lastIndex = i;
    const [text, blank, operators, word, char] = lexeme.exec(source)!;
    if (blank !== undefined) {
      i += text.length;
      continue;
    }
    const regexHere = regexAllowed;
    regexAllowed = false;
    if (operators !== undefined) {
      i += text.length;
      regexAllowed = true;
    } else if (word !== undefined) {
      regexAllowed = REGEX_AFTER_WORD.has(word);
      tokens.push({ type: 'word', value: word, at: i });
      i += word.length;
    } else if (char === "'" || char === '"') {
      const next = skipString(i);
      const value = unescapeJs(source.slice(i + 1, next - 1));
      tokens.push({ type: 'string', value, pattern: [value], at: i });
      i = next;
    } else if (char === '`') {
      const { pattern, next } = template(i);
      tokens.push({ type: 'template', value: '', pattern, at: i });
      i = next;
    } else if (char === '/' && regexHere) {
      let j = i + 1;
      let inClass = false;
      while (j < source.length && (inClass || source[j] !== '/') && source[j] !== '\n') {
        if (source[j] === '\\') j++;
        else if (source[j] === '[') inClass = true;
        else if (source[j] === ']') inClass = false;
        j++;
      }
      j++;
      while (/[a-z]/.test(source[j] ?? '')) j++;
      i = j;
    } else {
      tokens.push({ type: 'punct', value: char!, at: i });
      regexAllowed = !')]}'.includes(char!);
      i++;
    }
  }
  return tokens;
}

/** The .each() placeholders (vitest: printf-style and $name for objects) stand for any text. */
function eachPattern(pattern: Pattern): Pattern {
  return pattern.flatMap((part) =>
    typeof part === 'string'
      ? part.split(/(%[sdifjoO#]|\$[A-Za-z_]\w*(?:\.\w+)*)/).map((piece, index) => (index % 2 ? ANY : piece))
      : [part],
  );
}

const MODIFIERS_WITH_ARGUMENTS = new Set(['each', 'for', 'skipIf', 'runIf']);

function titlesIn(source: string): Title[] {
  const tokens = tokenize(source);
  const closing = new Map<number, number>();
  const open: number[] = [];
  tokens.forEach((token, index) => {
    if (token.type !== 'punct') return;
    if ('([{'.includes(token.value)) open.push(index);
    else if (')]}'.includes(token.value) && open.length > 0) closing.set(open.pop()!, index);
  });
  const titles: Title[] = [];
  for (let index = 0; index < tokens.length; index++) {
    const token = tokens[index]!;
    if (token.type !== 'word' || !['it', 'test', 'describe'].includes(token.value)) continue;
    if (tokens[index - 1]?.value === '.') continue;
    let k = index + 1;
    let each = false;
    while (tokens[k]?.value === '.' && tokens[k + 1]?.type === 'word') {
      const modifier = tokens[k + 1]!.value;
      k += 2;
      if (modifier === 'each' || modifier === 'for') each = true;
      if (MODIFIERS_WITH_ARGUMENTS.has(modifier) && tokens[k]?.value === '(') k = (closing.get(k) ?? k) + 1;
    }
    if (tokens[k]?.value !== '(') continue;
    const call = k;
    let pattern: Pattern = [];
    let j = call + 1;
    for (;;) {
      const operand = tokens[j];
      if (operand?.pattern) pattern.push(...operand.pattern);
      else pattern.push(ANY);
      j++;
      if (tokens[j]?.value !== '+') break;
      j++;
    }
    pattern = normalize(each ? eachPattern(pattern) : pattern);
    // A title with no literal part (a variable) would match any citation: it backs none.
    if (!pattern.some((part) => part !== ANY)) continue;
    const end = tokens[closing.get(call) ?? call]!.at;
    titles.push({ kind: token.value === 'describe' ? 'describe' : 'test', pattern, start: tokens[call]!.at, end });
  }
  return titles;
}

// ---- Matching

function normalize(pattern: Pattern): Pattern {
  const merged: Pattern = [];
  for (const part of pattern) {
    const last = merged.at(-1);
    if (part === ANY) {
      if (last !== ANY) merged.push(ANY);
    } else if (typeof last === 'string') merged[merged.length - 1] = last + part;
    else merged.push(part);
  }
  return merged.filter((part) => part !== '').map((part) => (part === ANY ? ANY : part.replace(/\s+/g, ' ')));
}

function citedPattern(title: string): Pattern {
  return normalize(title.split('…').flatMap((piece, index) => (index === 0 ? [piece] : [ANY, piece])));
}

/** Whether some text matches both patterns (each ANY any text): a walk over both, character by character. */
function overlap(a: Pattern, b: Pattern): boolean {
  const chars = (pattern: Pattern): Pattern => pattern.flatMap((part): Pattern => (part === ANY ? [ANY] : [...part]));
  const x = chars(a);
  const y = chars(b);
  const seen = new Map<number, boolean>();
  const walk = (i: number, j: number): boolean => {
    const key = i * (y.length + 1) + j;
    const known = seen.get(key);
    if (known !== undefined) return known;
    let result: boolean;
    if (i === x.length && j === y.length) result = true;
    else if (x[i] === ANY) result = walk(i + 1, j) || (j < y.length && walk(i, j + 1));
    else if (y[j] === ANY) result = walk(i, j + 1) || (i < x.length && walk(i + 1, j));
    else result = i < x.length && j < y.length && x[i] === y[j] && walk(i + 1, j + 1);
    seen.set(key, result);
    return result;
  };
  return walk(0, 0);
}

/** Whether a test file's title could be the cited one: a quick test on the literal parts first. */
function matches(title: Title, cited: Pattern): boolean {
  const literal = (pattern: Pattern) => pattern.filter((part): part is string => part !== ANY);
  if (!title.pattern.includes(ANY) && !cited.includes(ANY)) return title.pattern[0] === cited[0];
  const own = literal(title.pattern).join('');
  if (!title.pattern.includes(ANY) && !literal(cited).every((part) => own.includes(part))) return false;
  return overlap(title.pattern, cited);
}

/** The titles of the file that end a path matching `path`, each inside the one before. */
function resolvePath(titles: Title[], path: Pattern[], within?: Title): Title[] {
  const [first, ...rest] = path;
  if (!first) return within ? [within] : [];
  const inside = titles.filter(
    (title) => !within || (title.start > within.start && title.end < within.end && within.kind === 'describe'),
  );
  return inside.filter((title) => matches(title, first)).flatMap((title) => resolvePath(titles, rest, title));
}

function show(pattern: Pattern): string {
  return pattern.map((part) => (part === ANY ? '…' : part)).join('');
}

/** The file's title sharing the most words with the cited one: a hint for whoever fixes the citation. */
function closest(titles: Title[], cited: string): string | undefined {
  const words = (text: string) => new Set(text.toLowerCase().match(/[a-z0-9_]+/g) ?? []);
  const wanted = words(cited);
  let best: { title: string; score: number } | undefined;
  for (const title of titles) {
    const text = show(title.pattern);
    const have = words(text);
    const score = [...wanted].filter((word) => have.has(word)).length / Math.max(wanted.size, have.size, 1);
    if (!best || score > best.score) best = { title: text, score };
  }
  return best && best.score > 0.3 ? best.title : undefined;
}

// ---- The check

function problems(): { problems: string[]; checked: number; allowedUsed: Set<number> } {
  const found: string[] = [];
  const allowedUsed = new Set<number>();
  const cache = new Map<string, Title[]>();
  let checked = 0;
  for (const doc of documents()) {
    for (const citation of citationsIn(doc, readFileSync(join(root, doc), 'utf8'))) {
      const where = `${doc}:${citation.line}: test/${citation.file}`;
      if (!existsSync(join(root, 'test', citation.file))) {
        found.push(`${where}: no such file`);
        continue;
      }
      const titles = cache.get(citation.file) ?? titlesIn(readFileSync(join(root, 'test', citation.file), 'utf8'));
      cache.set(citation.file, titles);
      for (const path of citation.titles) {
        checked++;
        const cited = path.join(' › ').replace(/\s+/g, ' ');
        if (resolvePath(titles, path.map(citedPattern)).length > 0) continue;
        const allowed = UNVERIFIABLE.findIndex(
          (entry) => entry.doc === doc && `test/${citation.file}` === entry.file && entry.title === cited,
        );
        if (allowed >= 0) {
          allowedUsed.add(allowed);
          continue;
        }
        const hint = closest(titles, path.at(-1)!);
        found.push(`${where} ("${cited}"): no such title in the file${hint ? `; closest: "${hint}"` : ''}`);
      }
    }
  }
  return { problems: found, checked, allowedUsed };
}

describe('the tests the documents cite', () => {
  const result = problems();

  it('exist: every cited file is there and holds every quoted title', () => {
    expect(result.problems.join('\n')).toBe('');
  });

  it('are read: docs/security.md alone cites over a hundred titles', () => {
    const security = citationsIn('docs/security.md', readFileSync(join(root, 'docs/security.md'), 'utf8'));
    expect(security.flatMap((citation) => citation.titles).length).toBeGreaterThan(100);
    expect(result.checked).toBeGreaterThan(150);
  });

  it('need each UNVERIFIABLE entry: an entry nothing uses any more is removed', () => {
    expect(UNVERIFIABLE.filter((_, index) => !result.allowedUsed.has(index))).toEqual([]);
  });
});

describe('the reader itself', () => {
  it('takes the quoted titles of a citation and › paths, not commentary or code spans; a file named inside has its own', () => {
    const text = [
      'A row. | `test/a.test.ts` ("one", "two"; "outer" › "inner": words "not this"; the filtering: "three");',
      '`test/b.test.ts` (no titles, `code "span"`, `test/c.test.ts`, "of c"), and in prose `test/d.test.ts`,',
      '"four", "five". Then test/e.system "six\nwrapped \\"q\\"" and test/fixtures/x.mjs, test/helpers/raw-client.ts.',
    ].join('\n');
    const citations = citationsIn('doc.md', text).map(({ line, file, titles }) => ({ line, file, titles }));
    expect(citations).toEqual([
      { line: 1, file: 'a.test.ts', titles: [['one'], ['two'], ['outer', 'inner'], ['three']] },
      { line: 2, file: 'b.test.ts', titles: [] },
      { line: 2, file: 'c.test.ts', titles: [['of c']] },
      { line: 2, file: 'd.test.ts', titles: [['four'], ['five']] },
      { line: 3, file: 'e.system.test.ts', titles: [['six\nwrapped "q"']] },
    ]);
  });

  it('finds the titles a test file gives, built ones as patterns of their literal parts', () => {
    const source = [
      "describe('outer', () => {",
      "  const re = /it('no'/; // it('comment')",
      "  it('plain \\'quoted\\'', () => {});",
      // biome-ignore lint/suspicious/noTemplateCurlyInString: a test file's source, as text
      '  for (const n of [1, 2]) it(`loop ${n} (${`nested ${n}`})`, () => {});',
      "  it.each([[1], [2]])('each %s and $name', () => {});",
      "  describe.skipIf(process.env.X === '1')('inner', () => { test('deep ' + what, () => {}); });",
      '  it(name, () => {});',
      '});',
      "it('after', () => {});",
    ].join('\n');
    const titles = titlesIn(source);
    expect(titles.map((title) => `${title.kind} ${show(title.pattern)}`)).toEqual([
      'describe outer',
      "test plain 'quoted'",
      'test loop … (…)',
      'test each … and …',
      'describe inner',
      'test deep …',
      'test after',
    ]);
    const found = (...path: string[]) => resolvePath(titles, path.map(citedPattern)).length > 0;
    expect(found('outer', 'inner', 'deep stuff')).toBe(true);
    expect(found('outer', 'after')).toBe(false);
    expect(found('inner', 'loop 1 (nested 1)')).toBe(false);
    expect(found('loop 7 (x)')).toBe(true);
    expect(found('loop…')).toBe(true);
    expect(found('plain…')).toBe(true);
    expect(found('plain')).toBe(false);
    expect(found("…quoted'")).toBe(true);
    expect(found('each … and x')).toBe(true);
    expect(found('each 1 or 2')).toBe(false);
    expect(found('anything at all')).toBe(false);
  });
});
