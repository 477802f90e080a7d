using System.Numerics.Tensors;
using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Tests.Golden;

namespace PaliGemma.CpuOnly.Tests.GoldenPg2;

/// <summary>
/// The sliding-window layers' ring cache: fixed memory however long the sequence, and the same numbers as running the whole
/// sequence again without a cache (which attends the fresh keys of every position through the same mask rule).
/// </summary>
public sealed class SlidingWindowCacheTests
{
    [Theory]
    [InlineData(100)]
    [InlineData(5000)]
    public void Sliding_layers_hold_window_slots_whatever_the_capacity(int capacity)
    {
        var decoder = Pg2Golden.Model(Pg2Golden.Tiny).Decoder;
        int window = decoder.Config.SlidingWindow!.Value, batch = 2;
        var cache = decoder.CreateCache(batch, capacity);
        long expectedBytes = 0;
        for (int l = 0; l < cache.Layers; l++)
        {
            bool sliding = l % 2 == 0;
            Assert.Equal(sliding ? window : 0, cache.Window(l));
            Assert.Equal(sliding ? window : capacity, cache.Slots(l));
            Assert.Equal(sliding, cache.IsRing(l));
            expectedBytes += 2L * batch * cache.Slots(l) * decoder.KvWidth * sizeof(float);
        }
        Assert.Equal(expectedBytes, cache.SizeInBytes);
    }

    [Fact]
    public void A_cache_shorter_than_the_window_keeps_every_position_in_place()
    {
        var decoder = Pg2Golden.Model(Pg2Golden.Tiny).Decoder;
        var cache = decoder.CreateCache(1, 5);
        Assert.Equal(5, cache.Slots(0));
        Assert.False(cache.IsRing(0));
    }

    /// <summary>
    /// A left-padded batch generates five times the window past its prompt. The sliding layers' storage never grows, and
    /// every step's logits equal a cache-free pass over prompt + tokens so far (prefix bidirectional, the rest causal).
    /// </summary>
    [Fact]
    public void A_long_generation_keeps_sliding_memory_fixed_and_matches_a_cache_free_recompute()
    {
        var sample = Pg2Golden.Sample(Pg2Golden.Tiny, "b1_batch2");
        var model = Pg2Golden.Model(Pg2Golden.Tiny);
        int window = model.Config.Text.SlidingWindow!.Value, vocab = model.Decoder.VocabSize;
        var idsArray = sample.Npy("input_ids");
        int batch = (int)idsArray.Shape[0], tokens = (int)idsArray.Shape[1], steps = 5 * window;
        int[] ids = idsArray.ToInt64().Select(x => (int)x).ToArray();
        byte[] mask = sample.Npy("attention_mask").ToInt64().Select(x => (byte)x).ToArray();
        Assert.Contains((byte)0, mask);
        var features = model.EncodeImages(sample.Floats("pixel_values"), batch);

        var session = new PaliGemmaSession(model, batch, tokens + steps);
        long bytes = session.Cache.SizeInBytes;
        long slidingBytes = 2L * batch * window * model.Decoder.KvWidth * sizeof(float);
        var logits = new float[batch * vocab];
        session.Prefill(ids, mask, tokens, features, logits);
        var generated = new int[batch][];
        for (int b = 0; b < batch; b++) generated[b] = new int[steps];
        var next = new int[batch];
        for (int step = 0; step < steps; step++)
        {
            for (int b = 0; b < batch; b++)
            {
                var row = logits.AsSpan(b * vocab, vocab);
                if (step > 0) CheckAgainstRecompute(model, ids, mask, features, tokens, generated, step, b, row);
                next[b] = generated[b][step] = TensorPrimitives.IndexOfMax(row);
            }
            if (step + 1 < steps) session.Decode(next, logits);
            Assert.Equal(bytes, session.Cache.SizeInBytes);
            Assert.Equal(window, session.Cache.Slots(0));
        }
        Assert.Equal(tokens + steps - 1, session.Length);
        Assert.True(session.Length > 4 * window);
        Assert.Equal(slidingBytes, 2L * batch * session.Cache.Slots(0) * model.Decoder.KvWidth * sizeof(float));
    }

    private static void CheckAgainstRecompute(PaliGemmaModel model, int[] prompt, byte[] promptMask, float[] features, int tokens,
        int[][] generated, int step, int row, ReadOnlySpan<float> actual)
    {
        int batch = generated.Length, length = tokens + step, vocab = model.Decoder.VocabSize;
        var ids = new int[batch * length];
        var mask = new byte[batch * length];
        for (int b = 0; b < batch; b++)
        {
            prompt.AsSpan(b * tokens, tokens).CopyTo(ids.AsSpan(b * length));
            promptMask.AsSpan(b * tokens, tokens).CopyTo(mask.AsSpan(b * length));
            generated[b].AsSpan(0, step).CopyTo(ids.AsSpan(b * length + tokens));
            mask.AsSpan(b * length + tokens, step).Fill(1);
        }
        var session = new PaliGemmaSession(model, batch, length);
        var logits = new float[batch * vocab];
        session.Prefill(ids, mask, length, features, logits, new PrefillOptions { PrefixLength = tokens });
        Compare.Close("pg2_ring_cache_vs_recompute", $"row {row} step {step}", actual, logits.AsSpan(row * vocab, vocab));
    }

    /// <summary>
    /// Several tokens appended after a prompt (the ring is read in position order into scratch), then one more (the ring read
    /// in place), equal one pass over the whole sequence with the same prefix. With left padding inside the window, the
    /// ring must also carry each slot's padding flag.
    /// </summary>
    [Theory]
    [InlineData(19, 0, 6)]   // prompt 2W + 3: the ring has rolled before the appends
    [InlineData(10, 6, 2)]   // pads 0..5 are still inside the window of the appended tokens
    [InlineData(5, 2, 4)]    // a prompt shorter than the window: the ring fills up during the appends
    public void Appending_several_tokens_then_one_equals_a_single_pass(int prompt, int pads, int extra)
    {
        var decoder = Pg2Golden.Model(Pg2Golden.Tiny).Decoder;
        int h = decoder.Config.HiddenSize, window = decoder.Config.SlidingWindow!.Value;
        int total = prompt + extra + 1;
        Assert.True(total > window);
        var random = new Random(11);
        int[] ids = Enumerable.Range(0, total).Select(_ => random.Next(3, 2000)).ToArray();

        float[] Embed(int from, int count)
        {
            var hidden = new float[count * h];
            for (int i = 0; i < count; i++) decoder.EmbedToken(ids[from + i], hidden.AsSpan(i * h, h));
            return hidden;
        }
        int[] Positions(int from, int count) => Enumerable.Range(from + 1, count).ToArray();
        void MarkValid(KvCache cache) => cache.Valid.AsSpan(pads, total - pads).Fill(1);

        var whole = decoder.CreateCache(1, total);
        MarkValid(whole);
        var expected = Embed(0, total);
        decoder.Forward(expected, total, Positions(0, total), whole, prefixLength: prompt);

        var cache = decoder.CreateCache(1, total);
        Assert.True(cache.IsRing(0));
        MarkValid(cache);
        decoder.Forward(Embed(0, prompt), prompt, Positions(0, prompt), cache, prefixLength: prompt);
        var several = Embed(prompt, extra);
        decoder.Forward(several, extra, Positions(prompt, extra), cache, prefixLength: 0);
        var one = Embed(prompt + extra, 1);
        decoder.Forward(one, 1, Positions(prompt + extra, 1), cache, prefixLength: 0);

        Compare.Close("pg2_ring_cache_vs_recompute", "several appended tokens", several, expected.AsSpan(prompt * h, extra * h));
        Compare.Close("pg2_ring_cache_vs_recompute", "one token after them", one, expected.AsSpan((total - 1) * h, h));
    }
}
