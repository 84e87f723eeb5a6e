// A setupFiles entry (vitest.config.ts): after each test file's own afterAll hooks (root hooks registered here run
// last), ends the children it started outside a test and left running (test/helpers/children.ts).
import { afterAll } from 'vitest';
import { reapFileChildren } from './children.js';

afterAll(reapFileChildren);
