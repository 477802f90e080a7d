using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Tests.Golden;

namespace PaliGemma.CpuOnly.Tests.Model;

public sealed class ProgressTests
{
    private sealed class Recorder : IProgress<InferenceProgress>
    {
        public List<InferenceProgress> Reports { get; } = [];
        public void Report(InferenceProgress value) => Reports.Add(value);
    }

    [Fact]
    public void Generation_reports_every_vision_and_prompt_layer_in_order()
    {
        var model = GoldenData.Model("small-mha-84");
        var recorder = new Recorder();
        var image = new PaliGemma.CpuOnly.Model.Imaging.RgbImage(8, 8, new byte[8 * 8 * 3]);
        new PaliGemmaGenerator(model).Generate(new GenerationRequest(image, "caption en"), new GenerationOptions { MaxNewTokens = 3, Progress = recorder });

        int vision = model.Config.Vision.NumHiddenLayers, text = model.Config.Text.NumHiddenLayers;
        var expected = Enumerable.Range(1, vision).Select(i => new InferenceProgress("vision", i, vision))
            .Concat(Enumerable.Range(1, text).Select(i => new InferenceProgress("prefill", i, text)));
        Assert.Equal(expected, recorder.Reports);
    }
}
