using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Tests.Golden;
using PaliGemma.CpuOnly.Tests.Tensors;

namespace PaliGemma.CpuOnly.Tests.Model;

/// <summary>
/// A decode step reuses the buffers its session's cache keeps (activations, attention scratch, logits): after the first step
/// it allocates nothing. The tiny golden models' operations stay below the kernels' parallel thresholds, so everything runs
/// on this thread and the per-thread counter sees every byte.
/// </summary>
public class DecodeAllocationTests
{
    [Theory]
    [InlineData("tiny-mqa-56", false)]
    [InlineData("small-mha-84", false)]
    [InlineData("pg2-mha-84-sw16", true)]   // Gemma 2: sliding-window ring layers and soft-capped logits
    public void Decode_steps_after_the_first_allocate_nothing(string caseName, bool gemma2)
    {
        var model = GoldenData.Model(caseName, root: gemma2 ? TestPaths.GoldenPg2 : null);
        int[] ids = model.Tokenizer.BuildPrompt("caption en", model.NumImageTokens);
        var features = model.EncodeImages(new float[3 * model.ImageSize * model.ImageSize], 1);
        const int steps = 20, windows = 3;   // 20 steps pass the pg2 ring (window 16) on their own
        var session = new PaliGemmaSession(model, 1, ids.Length + steps * windows + 2);
        var logits = new float[session.VocabSize];
        session.Prefill(ids, default, ids.Length, features, logits);
        int[] next = [1000];
        session.Decode(next, logits);   // the first step may size the workspace

        // Up to three windows: a one-time runtime event in the first (the JIT promoting a method to tier 1) is not a
        // per-token allocation, which would show in every window.
        long allocated = 0;
        for (int window = 0; window < windows; window++)
        {
            long before = GC.GetAllocatedBytesForCurrentThread();
            for (int i = 0; i < steps; i++)
            {
                next[0] = 1000 + i;
                session.Decode(next, logits);
            }
            allocated = GC.GetAllocatedBytesForCurrentThread() - before;
            if (allocated == 0)
                return;
        }
        Assert.Fail($"{caseName}: every window of {steps} decode steps allocated; the last {allocated} bytes");
    }
}
