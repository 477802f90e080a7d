using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Model.Imaging;
using PaliGemma.CpuOnly.Tests.Golden;

namespace PaliGemma.CpuOnly.Tests.Model;

public sealed class PaddingRowTests
{
    /// <summary>
    /// The golden models have 2304 embedding rows for 2300 tokens; greedy "detect tree" on the gray image picks one of
    /// the rows with no token (found by the server tests). Generation must keep the id and go on, as transformers does.
    /// </summary>
    [Fact]
    public void Generation_survives_an_id_with_no_token()
    {
        var model = GoldenData.Model("tiny-mqa-56");
        var image = ImageLoader.Load(Path.Combine(TestPaths.Golden, "tiny-mqa-56", "gray_200x150.png"));
        var result = new PaliGemmaGenerator(model).Generate(new GenerationRequest(image, "detect tree"), new GenerationOptions { MaxNewTokens = 24 });
        Assert.Contains(result.GeneratedIds, id => id >= model.Tokenizer.PieceCount);
        Assert.Equal(model.Tokenizer.Decode(result.GeneratedIds.Where(id => id != model.Tokenizer.EosId).ToArray()), result.Text);
    }
}
