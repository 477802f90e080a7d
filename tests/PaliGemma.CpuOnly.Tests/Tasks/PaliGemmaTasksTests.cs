using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Model.Imaging;
using PaliGemma.CpuOnly.Model.Tasks;
using PaliGemma.CpuOnly.Tests.Tensors;

namespace PaliGemma.CpuOnly.Tests.Tasks;

/// <summary>The task API over the tiny random-weight checkpoint: prompts, plumbing and masks, not answer quality.</summary>
public sealed class PaliGemmaTasksTests
{
    private static readonly string ModelDir = Path.Combine(TestPaths.Golden, "tiny-mqa-56");

    [Fact]
    public void Each_task_generates_from_its_prompt_like_the_generator()
    {
        using var model = PaliGemmaModel.Load(ModelDir);
        var image = ImageLoader.Load(Path.Combine(ModelDir, "gray_200x150.png"));
        var tasks = new PaliGemmaTasks(model);
        var options = new GenerationOptions { MaxNewTokens = 5 };
        var generator = new PaliGemmaGenerator(model);
        foreach (var (result, prompt, task) in new[]
                 {
                     (tasks.Caption(image, "en", options), "caption en", PaliGemmaTask.Caption),
                     (tasks.Answer(image, "what is it?", "de", options), "answer de what is it?", PaliGemmaTask.Answer),
                     (tasks.Detect(image, ["cat", "dog"], options), "detect cat ; dog", PaliGemmaTask.Detect),
                     (tasks.Segment(image, ["cat"], options), "segment cat", PaliGemmaTask.Segment),
                     (tasks.Ocr(image, options), "ocr", PaliGemmaTask.Ocr),
                 })
        {
            var expected = generator.Generate(new GenerationRequest(image, prompt), options);
            Assert.Equal(prompt, result.Prompt);
            Assert.Equal(task, result.Task);
            Assert.Equal(expected.GeneratedIds, result.GeneratedIds);
            Assert.Equal(expected.Text, result.Text);
            Assert.Equal((200, 150), (result.ImageWidth, result.ImageHeight));
            if (task is not (PaliGemmaTask.Detect or PaliGemmaTask.Segment)) Assert.Empty(result.Objects);
            else Assert.Equal(OutputParser.Parse(result.Text, 200, 150).Count, result.Objects.Count);
        }
    }

    [Fact]
    public void DecodeMasks_fills_the_full_image_mask_of_segment_objects_only()
    {
        var decoder = MaskDecoder.Load(Path.Combine(TestPaths.Golden, "segmentation", "vae.npz"));
        const string segs = "<seg118><seg087><seg099><seg025><seg041><seg030><seg117><seg047><seg033><seg055><seg112><seg041><seg111><seg055><seg022><seg020>";
        var objects = OutputParser.Parse($"<loc0100><loc0100><loc0900><loc0900>{segs} cat ; <loc0100><loc0100><loc0900><loc0900> dog", 90, 70);
        PaliGemmaTasks.DecodeMasks(objects, decoder);
        int[] codes = [118, 87, 99, 25, 41, 30, 117, 47, 33, 55, 112, 41, 111, 55, 22, 20];
        var expected = MaskPlacement.FullMask(decoder.Decode(codes), MaskPlacement.PixelBoxOf([100, 100, 900, 900], 90, 70), 90, 70);
        Assert.Equal(expected, objects[0].Mask);
        Assert.Null(objects[1].Mask);
        Assert.Throws<ArgumentException>(() => objects[1].SetMask(new byte[10]));
    }
}
